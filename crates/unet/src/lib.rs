//! unet (placeholder)
