//! The crate's error type.

use std::path::PathBuf;

/// Where to get the raw dataset; part of the "missing/empty raw folder" errors.
pub const KAGGLE_URL: &str = "https://www.kaggle.com/datasets/splcher/animefacedataset";

/// Everything that can go wrong while preparing or loading data. Every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The raw image folder does not exist.
    #[error(
        "raw image folder {} not found: download the anime face dataset from {KAGGLE_URL} and unzip it so the images are in dataset/anime/raw/images (or pass --raw DIR)",
        .path.display()
    )]
    RawMissing { path: PathBuf },

    /// The raw image folder exists but holds no files.
    #[error(
        "raw image folder {} has no image files{hint}: download the anime face dataset from {KAGGLE_URL} and unzip it so the images are in dataset/anime/raw/images (or pass --raw DIR)",
        .path.display()
    )]
    RawEmpty { path: PathBuf, hint: String },

    /// An I/O operation on `path` failed.
    #[error("{action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The packed dataset file does not exist.
    #[error("packed dataset {} not found: run `cargo xtask prepare-data` first", .path.display())]
    PackedMissing { path: PathBuf },

    /// The file exists but is not a packed dataset (not safetensors, no `images` tensor, wrong dtype or shape).
    #[error("{} is not a packed anime-data dataset: {reason}", .path.display())]
    NotPacked { path: PathBuf, reason: String },

    /// Arguments that do not fit together (pixel buffer length, indices out of range, ...).
    #[error("{0}")]
    Invalid(String),

    /// No image survived preparation, so there is nothing to pack.
    #[error("no usable images among {total} input files ({skipped} skipped, see {})", .skipped_file.display())]
    NothingToPack { total: usize, skipped: usize, skipped_file: PathBuf },

    /// Encoding/decoding an image we produce ourselves failed.
    #[error("image {name}: {source}")]
    Image {
        name: String,
        #[source]
        source: image::ImageError,
    },

    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),

    /// Reading a parquet file failed (feature `hub`).
    #[cfg(feature = "hub")]
    #[error("parquet {}: {reason}", .path.display())]
    Parquet { path: PathBuf, reason: String },

    /// Fetching from the Hugging Face hub failed (feature `hub`).
    #[cfg(feature = "hub")]
    #[error("hub dataset {dataset}: {reason}")]
    Hub { dataset: String, reason: String },
}

impl DataError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { action, path: path.into(), source }
    }
}
