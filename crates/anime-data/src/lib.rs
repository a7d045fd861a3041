//! anime-data: everything between the raw anime-face images and a training batch.
//!
//! This crate owns **preprocessing** and **loading**:
//!
//! * [`prepare`] turns the raw Kaggle anime face dataset (splcher/animefacedataset: ~63.6k JPEGs
//!   of ~90-120 px) into `size x size` RGB images (`<out>/images/`, same names) and one packed
//!   file `<out>/packed.safetensors` (a u8 tensor `images` `[N, S, S, 3]`, HWC RGB, with the
//!   file names in the safetensors metadata). Resizing matches the reference's Pillow
//!   `Image.resize((64, 64))` (BICUBIC = Catmull-Rom, antialiased, no crop) by default; see
//!   [`imaging`]. Bad inputs are skipped with a reason, never fatal; work is parallel (rayon)
//!   and resumable. `cargo xtask prepare-data` is a thin front end to it.
//! * [`PackedDataset`] loads the packed file in one read; [`split_indices`] and [`epoch_order`]
//!   give the seeded train/val/test split and per-epoch order; [`DeviceImages`] keeps the whole
//!   set on the training device and gathers `[B, 3, S, S]` f32 batches in `[-1, 1]` there.
//! * [`synthetic_faces`] and [`write_images`] make a small procedural face dataset for demos
//!   and tests.
//! * With the `hub` feature: `hub::prepare_from_parquet` and `hub::prepare_from_hub` prepare
//!   image-parquet datasets (Hugging Face `datasets` layout) through the same code path.

pub mod bench;
mod device;
mod error;
pub mod imaging;
mod packed;
mod prepare;
mod split;
mod synth;

#[cfg(feature = "hub")]
pub mod hub;

pub use device::DeviceImages;
pub use error::{DataError, KAGGLE_URL};
pub use imaging::{Crop, OutputFormat, DEFAULT_MAX_PIXELS};
pub use packed::{PackedDataset, PACKED_FORMAT};
pub use prepare::{
    output_name, prepare, PrepareOptions, PrepareReport, Skipped, PACKED_FILE, SETTINGS_FILE, SKIPPED_FILE,
};
pub use split::{epoch_order, split_indices, Split, REFERENCE_SEED, REFERENCE_TEST_FRAC, REFERENCE_VAL_FRAC};
pub use synth::{synthetic_faces, write_images};

/// The side of prepared images unless asked otherwise: the reference's 64x64.
pub const DEFAULT_SIZE: u32 = 64;
