//! anime-data (placeholder)
