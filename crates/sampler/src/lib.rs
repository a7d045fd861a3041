//! sampler (placeholder)
