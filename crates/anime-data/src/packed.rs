//! The packed dataset file: one safetensors file with a single u8 tensor `images`
//! `[N, size, size, 3]` (HWC, RGB) and, in `__metadata__`, `names` (a JSON array of the N file
//! names, in tensor order), `size`, `format` = [`PACKED_FORMAT`] and `crc32` (of the pixels, in
//! hex; files written before it was added have none and are read unchecked).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::DataError;

/// Value of the `format` metadata key.
pub const PACKED_FORMAT: &str = "anime-data/packed-v1";

/// Name of the one tensor in the file.
pub const TENSOR_NAME: &str = "images";

/// All images of a dataset in memory: `len * size * size * 3` bytes, HWC RGB, plus their names.
#[derive(Clone)]
pub struct PackedDataset {
    /// The whole file as read (or just the pixels); the pixels start at `offset`.
    buf: Vec<u8>,
    offset: usize,
    names: Vec<String>,
    size: usize,
    /// CRC-32 of the pixels, once computed (on load when the file records one).
    crc32: std::sync::OnceLock<u32>,
}

impl std::fmt::Debug for PackedDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedDataset").field("len", &self.len()).field("size", &self.size).finish()
    }
}

impl PackedDataset {
    /// Reads a packed file in one read, validates it, and keeps the bytes without copying them.
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let buf = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DataError::PackedMissing { path: path.to_path_buf() })
            }
            Err(e) => return Err(DataError::io("cannot read", path, e)),
        };
        Self::from_bytes(buf, path)
    }

    /// Parses the bytes of a packed file (`path` is only used in error messages).
    pub fn from_bytes(buf: Vec<u8>, path: &Path) -> Result<Self, DataError> {
        let bad = |reason: String| DataError::NotPacked { path: path.to_path_buf(), reason };
        let (n, meta) = safetensors::SafeTensors::read_metadata(&buf)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let info = meta
            .info(TENSOR_NAME)
            .ok_or_else(|| bad(format!("no '{TENSOR_NAME}' tensor")))?;
        if info.dtype != safetensors::Dtype::U8 {
            return Err(bad(format!("'{TENSOR_NAME}' has dtype {:?}, expected U8", info.dtype)));
        }
        let shape = info.shape.clone();
        if shape.len() != 4 || shape[3] != 3 || shape[1] != shape[2] || shape[1] == 0 {
            return Err(bad(format!("'{TENSOR_NAME}' has shape {shape:?}, expected [N, S, S, 3]")));
        }
        let (count, size) = (shape[0], shape[1]);
        let (start, end) = info.data_offsets;
        let offset = 8 + n + start;
        debug_assert_eq!(end - start, count * size * size * 3);
        let metadata = meta.metadata().clone().unwrap_or_default();
        if let Some(s) = metadata.get("size") {
            if s.parse::<usize>().ok() != Some(size) {
                return Err(bad(format!("metadata size '{s}' does not match the tensor's {size}")));
            }
        }
        let names: Vec<String> = match metadata.get("names") {
            Some(json) => serde_json::from_str(json).map_err(|e| bad(format!("bad 'names' metadata: {e}")))?,
            None => (0..count).map(|i| format!("{i:06}")).collect(),
        };
        if names.len() != count {
            return Err(bad(format!("{} names for {count} images", names.len())));
        }
        let ds = PackedDataset { buf, offset, names, size, crc32: Default::default() };
        if let Some(want) = metadata.get("crc32") {
            // Pixels are not validated by anything else: a flipped bit would train silently.
            let got = format!("{:08x}", ds.pixels_crc32());
            if &got != want {
                return Err(bad(format!("pixel checksum {got} != {want} (corrupt: run prepare-data again)")));
            }
        }
        Ok(ds)
    }

    /// Wraps pixels (`names.len() * size * size * 3` bytes, HWC RGB) and their names.
    pub fn from_images(names: Vec<String>, size: usize, pixels: Vec<u8>) -> Result<Self, DataError> {
        if size == 0 {
            return Err(DataError::Invalid("image size must be positive".into()));
        }
        let expected = names.len() * size * size * 3;
        if pixels.len() != expected {
            return Err(DataError::Invalid(format!(
                "pixel buffer has {} bytes, expected {expected} for {} images of {size}x{size}x3",
                pixels.len(),
                names.len()
            )));
        }
        Ok(PackedDataset { buf: pixels, offset: 0, names, size, crc32: Default::default() })
    }

    /// Writes the file atomically: a temporary file in the same folder, fsync, rename.
    /// The output is byte-for-byte deterministic for the same contents.
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        let data_len = self.pixels().len();
        let mut meta = BTreeMap::new();
        meta.insert("format", PACKED_FORMAT.to_string());
        meta.insert("names", serde_json::to_string(&self.names).expect("strings serialise"));
        meta.insert("size", self.size.to_string());
        meta.insert("crc32", format!("{:08x}", self.pixels_crc32()));
        let header = serde_json::json!({
            "__metadata__": meta,
            TENSOR_NAME: {
                "dtype": "U8",
                "shape": [self.len(), self.size, self.size, 3],
                "data_offsets": [0, data_len],
            }
        });
        let mut header = serde_json::to_vec(&header).expect("json serialises");
        // safetensors pads the header with spaces to a multiple of 8 bytes.
        header.resize(header.len().next_multiple_of(8), b' ');
        write_atomic(path, |w| {
            w.write_all(&(header.len() as u64).to_le_bytes())?;
            w.write_all(&header)?;
            w.write_all(self.pixels())
        })
    }

    /// CRC-32 of all pixels (computed once).
    pub fn pixels_crc32(&self) -> u32 {
        *self.crc32.get_or_init(|| crc32fast::hash(self.pixels()))
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// No images at all.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Side of the square images, in pixels.
    pub fn size(&self) -> usize {
        self.size
    }

    /// File names, in image order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// All pixels: `len * size * size * 3` bytes, image-major, HWC, RGB.
    pub fn pixels(&self) -> &[u8] {
        &self.buf[self.offset..self.offset + self.names.len() * self.size * self.size * 3]
    }

    /// The pixels of image `i` (`size * size * 3` bytes, HWC RGB). Panics when out of range.
    pub fn image_pixels(&self, i: usize) -> &[u8] {
        assert!(i < self.names.len(), "image {i} of a packed dataset of {} images", self.names.len());
        let n = self.size * self.size * 3;
        &self.pixels()[i * n..(i + 1) * n]
    }

    /// Takes the dataset apart without copying the pixels: `(names, size, pixels)`.
    pub fn into_parts(self) -> (Vec<String>, usize, Vec<u8>) {
        let len = self.names.len() * self.size * self.size * 3;
        let mut buf = self.buf;
        buf.truncate(self.offset + len);
        buf.drain(..self.offset);
        (self.names, self.size, buf)
    }

    /// Image `i` as an [`image::RgbImage`]. Panics when out of range.
    pub fn image(&self, i: usize) -> image::RgbImage {
        let s = self.size as u32;
        image::RgbImage::from_raw(s, s, self.image_pixels(i).to_vec()).expect("length matches")
    }
}

/// Temporary name next to `path`: hidden, with the pid, ending in `.tmp`.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Creates the temporary exclusively, after removing a left-over of our pid (a link itself, not
/// its target): a link planted there is never written through.
fn create_fresh(tmp: &Path) -> std::io::Result<File> {
    let _ = std::fs::remove_file(tmp);
    std::fs::OpenOptions::new().write(true).create_new(true).open(tmp)
}

/// Writes `path` atomically: `write` fills a temporary file in the same folder, which is
/// flushed, fsynced and renamed over `path`. On any error the temporary file is removed.
pub(crate) fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<(), DataError> {
    let tmp = tmp_path(path);
    let result = (|| {
        let file = create_fresh(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        DataError::io("cannot write", path, e)
    })
}

/// Like [`write_atomic`] for a small buffer, without the fsync (many small files: the rename
/// still guarantees that a reader never sees a half-written file).
pub(crate) fn write_small_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    let result = create_fresh(&tmp).and_then(|mut f| f.write_all(bytes)).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
