//! The whole dataset resident on a device, and batches gathered there.
//!
//! The images stay u8 `[N, S, S, 3]` on the device (the 63.6k x 64x64x3 set is ~780 MB, so it
//! fits on any training GPU and the GPU never waits for the host). A batch is a handful of
//! kernels on the device:
//! 1. `index_select` of the batch's images along dim 0 (u8, u32 ids: candle has
//!    `is_u32_u8` kernels for CUDA and a generic CPU path);
//! 2. for horizontal flips, an `index_select` with a precomputed reversed index along the W axis,
//!    merged per image with `where_cond` and a per-image mask (skipped when nothing is flipped,
//!    a single `index_select` when everything is);
//! 3. `permute` to NCHW and cast to u32 (one strided kernel);
//! 4. the u8 -> f32 mapping `v / 127.5 - 1` through a 256-entry lookup table (`index_select`
//!    with u32 ids), which is exact: 0 -> -1.0 and 255 -> 1.0 precisely (`to_dtype(F32)` +
//!    `affine(2/255, -1)` gives 1.0000001 for 255 where the GPU fuses the multiply-add).
//!    u8 ids cannot be used: candle's `index_select` reads the maximum id (255) as padding.

use candle_core::{DType, Device, Tensor};

use crate::{DataError, PackedDataset};

/// The dataset as one u8 tensor `[N, S, S, 3]` on a device.
pub struct DeviceImages {
    images: Tensor,
    /// `[S]` u32: S-1, ..., 0, for flipping along W.
    reversed: Tensor,
    /// `[256]` f32: v / 127.5 - 1.
    lut: Tensor,
    len: usize,
    size: usize,
}

impl DeviceImages {
    /// Copies all images of `ds` to `device` (one host-to-device transfer).
    pub fn new(ds: &PackedDataset, device: &Device) -> Result<Self, DataError> {
        let s = ds.size();
        let images = Tensor::from_slice(ds.pixels(), (ds.len(), s, s, 3), device)?;
        Self::with_images(images, ds.len(), s)
    }

    /// Like [`DeviceImages::new`], consuming the dataset: on the CPU the pixel buffer becomes
    /// the tensor's storage without a copy (saves ~780 MB for the full set).
    pub fn from_packed(ds: PackedDataset, device: &Device) -> Result<Self, DataError> {
        if !device.is_cpu() {
            return Self::new(&ds, device);
        }
        let (names, s, pixels) = ds.into_parts();
        let images = Tensor::from_vec(pixels, (names.len(), s, s, 3), device)?;
        Self::with_images(images, names.len(), s)
    }

    fn with_images(images: Tensor, len: usize, size: usize) -> Result<Self, DataError> {
        let device = images.device().clone();
        let reversed = Tensor::from_vec((0..size as u32).rev().collect::<Vec<u32>>(), size, &device)?;
        let lut: Vec<f32> = (0..256).map(|v| (f64::from(v) / 127.5 - 1.0) as f32).collect();
        let lut = Tensor::from_vec(lut, 256, &device)?;
        Ok(DeviceImages { images, reversed, lut, len, size })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No images.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Side of the images.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The device the images live on.
    pub fn device(&self) -> &Device {
        self.images.device()
    }

    /// The raw u8 tensor `[N, S, S, 3]`.
    pub fn raw(&self) -> &Tensor {
        &self.images
    }

    /// `[B, 3, S, S]` f32 in [-1, 1] on the device, images `idx` in that order; `flip[i]` mirrors image i horizontally.
    pub fn batch(&self, idx: &[usize], flip: Option<&[bool]>) -> Result<Tensor, DataError> {
        let device = self.images.device();
        self.batch_with(idx, flip, |values: &[u32], len: usize| Tensor::from_slice(values, len, device))
    }

    /// [`DeviceImages::batch`], with the batch's image ids and flip mask (u32 `[B]` each) copied
    /// to the device by `upload(values, B)`: a trainer that queues work ahead passes a copy that
    /// does not wait for the device (this crate knows nothing of how).
    pub fn batch_with(&self, idx: &[usize], flip: Option<&[bool]>, upload: impl Fn(&[u32], usize) -> candle_core::Result<Tensor>) -> Result<Tensor, DataError> {
        let (b, s) = (idx.len(), self.size);
        if let Some(&bad) = idx.iter().find(|&&i| i >= self.len) {
            return Err(DataError::Invalid(format!("image index {bad} out of range for {} images", self.len)));
        }
        if let Some(f) = flip {
            if f.len() != b {
                return Err(DataError::Invalid(format!("{} flip flags for a batch of {b}", f.len())));
            }
        }
        let device = self.images.device();
        if b == 0 {
            return Ok(Tensor::zeros((0, 3, s, s), DType::F32, device)?);
        }
        let ids = upload(&idx.iter().map(|&i| i as u32).collect::<Vec<u32>>(), b)?;
        let mut x = self.images.index_select(&ids, 0)?; // [B,S,S,3] u8
        let flips = flip.map_or(0, |f| f.iter().filter(|&&v| v).count());
        if flips == b {
            x = x.index_select(&self.reversed, 2)?;
        } else if flips > 0 {
            let flipped = x.index_select(&self.reversed, 2)?;
            let mask: Vec<u32> = flip.expect("flips > 0").iter().map(|&v| u32::from(v)).collect();
            let mask = upload(&mask, b)?.reshape((b, 1, 1, 1))?.broadcast_as(x.shape())?;
            x = mask.where_cond(&flipped, &x)?;
        }
        // NCHW and u8 -> u32 in one strided cast (u32 ids: candle's index_select treats the
        // maximum id value as "padding" and returns 0, so u8 ids would map 255 to 0).
        let x = x.permute((0, 3, 1, 2))?.to_dtype(DType::U32)?.flatten_all()?;
        Ok(self.lut.index_select(&x, 0)?.reshape((b, 3, s, s))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset() -> PackedDataset {
        // 3 images of 4x4: pixel (y, x) of image n, channel c = n*64 + y*16 + x*4 + c (fits u8).
        let s = 4;
        let mut px = Vec::new();
        for n in 0..3u32 {
            for y in 0..s {
                for x in 0..s {
                    for c in 0..3 {
                        px.push((n * 64 + y * 16 + x * 4 + c).min(255) as u8);
                    }
                }
            }
        }
        px[0] = 0;
        let last = px.len() - 1;
        px[last] = 255;
        PackedDataset::from_images(vec!["a".into(), "b".into(), "c".into()], 4, px).unwrap()
    }

    fn expected(ds: &PackedDataset, n: usize, c: usize, y: usize, x: usize) -> f32 {
        let v = ds.pixels()[((n * 4 + y) * 4 + x) * 3 + c];
        (f64::from(v) / 127.5 - 1.0) as f32
    }

    #[test]
    fn batch_maps_pixels_to_nchw_in_range() {
        let ds = dataset();
        let dev = DeviceImages::new(&ds, &Device::Cpu).unwrap();
        let b = dev.batch(&[2, 0, 2], None).unwrap();
        assert_eq!(b.dims(), &[3, 3, 4, 4]);
        assert_eq!(b.dtype(), DType::F32);
        let flat: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert!(flat.iter().all(|v| (-1.0..=1.0).contains(v)));
        for (bi, &n) in [2usize, 0, 2].iter().enumerate() {
            for c in 0..3 {
                for y in 0..4 {
                    for x in 0..4 {
                        let got = flat[((bi * 3 + c) * 4 + y) * 4 + x];
                        assert_eq!(got, expected(&ds, n, c, y, x), "b{bi} c{c} y{y} x{x}");
                    }
                }
            }
        }
        // Exact end points.
        assert_eq!(flat[48], -1.0); // batch item 1 = image 0, c0, y0, x0 = 0 -> -1
        let b = dev.batch(&[2], None).unwrap();
        let flat: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(flat[47], 1.0); // image 2, c2, y3, x3 = 255 -> 1
    }

    #[test]
    fn batch_flips_only_flagged_images() {
        let ds = dataset();
        let dev = DeviceImages::new(&ds, &Device::Cpu).unwrap();
        for flip in [[true, false, true], [true, true, true], [false, false, false]] {
            let b = dev.batch(&[1, 1, 0], Some(&flip)).unwrap();
            let flat: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
            for (bi, &n) in [1usize, 1, 0].iter().enumerate() {
                for c in 0..3 {
                    for y in 0..4 {
                        for x in 0..4 {
                            let sx = if flip[bi] { 3 - x } else { x };
                            assert_eq!(flat[((bi * 3 + c) * 4 + y) * 4 + x], expected(&ds, n, c, y, sx));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn batch_with_copies_ids_and_mask_through_the_callers_upload() {
        let ds = dataset();
        let dev = DeviceImages::new(&ds, &Device::Cpu).unwrap();
        let seen = std::cell::RefCell::new(Vec::new());
        let upload = |v: &[u32], len: usize| {
            seen.borrow_mut().push(v.to_vec());
            Tensor::from_slice(v, len, &Device::Cpu)
        };
        let flip = [false, true, false];
        let got = dev.batch_with(&[2, 0, 1], Some(&flip), upload).unwrap();
        assert_eq!(*seen.borrow(), vec![vec![2, 0, 1], vec![0, 1, 0]], "the ids, then the flip mask");
        let plain = dev.batch(&[2, 0, 1], Some(&flip)).unwrap();
        assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), plain.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }

    #[test]
    fn from_packed_equals_new() {
        let ds = dataset();
        let a = DeviceImages::new(&ds, &Device::Cpu).unwrap().batch(&[2, 1], Some(&[true, false])).unwrap();
        let dev = DeviceImages::from_packed(ds, &Device::Cpu).unwrap();
        let b = dev.batch(&[2, 1], Some(&[true, false])).unwrap();
        let (a, b): (Vec<f32>, Vec<f32>) = (a.flatten_all().unwrap().to_vec1().unwrap(), b.flatten_all().unwrap().to_vec1().unwrap());
        assert_eq!(a, b);
        // into_parts on a loaded file (pixels behind a header) drops the header.
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("d.safetensors");
        dataset().save(&p).unwrap();
        let (names, size, px) = PackedDataset::load(&p).unwrap().into_parts();
        assert_eq!((names.len(), size), (3, 4));
        assert_eq!(px, dataset().pixels());
    }

    #[test]
    fn batch_rejects_bad_arguments() {
        let ds = dataset();
        let dev = DeviceImages::new(&ds, &Device::Cpu).unwrap();
        assert!(dev.batch(&[3], None).is_err());
        assert!(dev.batch(&[0, 1], Some(&[true])).is_err());
        assert_eq!(dev.batch(&[], None).unwrap().dims(), &[0, 3, 4, 4]);
        assert_eq!((dev.len(), dev.size()), (3, 4));
    }
}
