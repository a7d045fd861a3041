//! Image grids in torchvision's `make_grid` layout.

use candle_core::{DType, Tensor};
use image::RgbImage;

use crate::Result;

/// `[N, 3, H, W]` in [-1, 1] to 8-bit RGB images (rounded as `(x + 1) / 2 * 255`; values outside
/// the range are clipped, NaN becomes 0).
pub fn tensor_to_images(images: &Tensor) -> Result<Vec<RgbImage>> {
    let (n, c, h, w) = images.dims4()?;
    if c != 3 {
        return Err(crate::SamplerError::Invalid(format!("expected 3 channels, got {c}")));
    }
    let data = images
        .to_dtype(DType::F32)?
        .clamp(-1f32, 1f32)?
        .affine(127.5, 127.5)?
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let per = h * w * 3;
    Ok((0..n)
        .map(|i| {
            let px: Vec<u8> = data[i * per..(i + 1) * per].iter().map(|v| v.round().clamp(0.0, 255.0) as u8).collect();
            RgbImage::from_raw(w as u32, h as u32, px).expect("buffer size matches")
        })
        .collect())
}

/// torchvision `make_grid(images, nrow=ncol, padding)`: `padding` black pixels around and
/// between cells (so 16x16 cells of 64 px with padding 2 give 1058x1058). `ncol` is clamped to
/// `1..=images.len()`, every cell has the first image's size (larger images are cut), and no
/// images give a 0x0 image (which [`save_png`] refuses).
pub fn make_grid(images: &[RgbImage], ncol: usize, padding: usize) -> RgbImage {
    let n = images.len();
    if n == 0 {
        return RgbImage::new(0, 0);
    }
    let ncol = ncol.max(1).min(n);
    let nrow = n.div_ceil(ncol);
    let (w, h) = (images[0].width() as usize, images[0].height() as usize);
    let gw = ncol * (w + padding) + padding;
    let gh = nrow * (h + padding) + padding;
    let mut grid = RgbImage::new(gw as u32, gh as u32);
    for (i, img) in images.iter().enumerate() {
        let x0 = padding + (i % ncol) * (w + padding);
        let y0 = padding + (i / ncol) * (h + padding);
        image::imageops::replace(&mut grid, img, x0 as i64, y0 as i64);
    }
    grid
}

/// Height of the label band that [`with_column_labels`] adds above a grid.
pub const LABEL_BAND: u32 = 16;

/// Adds a black band above a `make_grid` grid with one white label centred over each column
/// (drawn with the built-in 3x5 font at scale 2). `cell` is the cell width in pixels.
pub fn with_column_labels(grid: &RgbImage, labels: &[String], cell: usize, padding: usize) -> RgbImage {
    let band = LABEL_BAND;
    let mut out = RgbImage::new(grid.width(), grid.height() + band);
    image::imageops::replace(&mut out, grid, 0, band as i64);
    for (j, label) in labels.iter().enumerate() {
        // Scale 2 when it fits in the cell, else 1.
        let scale = if crate::font::text_width(label, 2) as usize <= cell { 2 } else { 1 };
        if crate::font::text_width(label, scale) as usize > cell + padding {
            continue; // too small a cell for this label
        }
        let w = crate::font::text_width(label, scale) as i64;
        let x0 = (padding + j * (cell + padding)) as i64 + (cell as i64 - w) / 2;
        let y0 = (band as i64 - crate::font::text_height(scale) as i64) / 2 + 1;
        crate::font::draw_text(&mut out, label, x0, y0, scale, image::Rgb([255, 255, 255]));
    }
    out
}

/// Writes `img` as PNG, creating parent folders.
pub fn save_png(img: &RgbImage, path: &std::path::Path) -> Result<()> {
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| crate::SamplerError::Image { path: path.display().to_string(), reason: e.to_string() })?;
    // Through a temporary name: a full disk or a kill must not turn an earlier good file into a
    // truncated one. No fsync: these are regenerable, and folders of thousands (FID) would crawl.
    unet::weights::write_replacing(path, &png).map_err(|e| match e {
        unet::UNetError::Io { path, source } => crate::SamplerError::Io { path, source },
        e => crate::SamplerError::Image { path: path.display().to_string(), reason: e.to_string() },
    })
}

/// `[N, 3, H, W]` in [-1, 1] as a `make_grid` grid with `ncol` columns and 2 px padding.
pub fn tensor_grid(images: &Tensor, ncol: usize) -> Result<RgbImage> {
    Ok(make_grid(&tensor_to_images(images)?, ncol, 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_png_replaces_whole_files_or_keeps_the_old_one() {
        let tmp = std::env::temp_dir().join(format!("save_png_{}", std::process::id()));
        let path = tmp.join("a").join("g.png");
        save_png(&RgbImage::from_pixel(4, 4, image::Rgb([1, 2, 3])), &path).unwrap();
        save_png(&RgbImage::from_pixel(8, 8, image::Rgb([9, 9, 9])), &path).unwrap();
        assert_eq!(image::open(&path).unwrap().to_rgb8().get_pixel(7, 7).0, [9, 9, 9]);
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
        // A write that fails (here: its temporary cannot be created, as on a full disk) keeps
        // the earlier file whole; writing in place would already have truncated it.
        let before = std::fs::read(&path).unwrap();
        std::fs::create_dir(unet::weights::temporary_path(&path)).unwrap();
        assert!(save_png(&RgbImage::from_pixel(16, 16, image::Rgb([5, 5, 5])), &path).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);
        // A folder in the way of the file: an error, and no temporary left behind.
        let blocked = tmp.join("b").join("g.png");
        std::fs::create_dir_all(&blocked).unwrap();
        assert!(save_png(&RgbImage::new(2, 2), &blocked).is_err());
        assert_eq!(std::fs::read_dir(tmp.join("b")).unwrap().count(), 1);
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn grid_geometry_matches_torchvision() {
        let imgs: Vec<RgbImage> = (0..256).map(|_| RgbImage::from_pixel(64, 64, image::Rgb([255, 0, 0]))).collect();
        let g = make_grid(&imgs, 16, 2);
        assert_eq!((g.width(), g.height()), (1058, 1058));
        assert_eq!(g.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(g.get_pixel(2, 2).0, [255, 0, 0]);
        assert_eq!(g.get_pixel(66, 10).0, [0, 0, 0]);
        assert_eq!(g.get_pixel(68, 10).0, [255, 0, 0]);
        // A partial last row still takes a full row.
        let g = make_grid(&imgs[..10], 4, 2);
        assert_eq!((g.width(), g.height()), (4 * 66 + 2, 3 * 66 + 2));
    }

    #[test]
    fn labels_add_a_band_on_top() {
        let imgs: Vec<RgbImage> = (0..6).map(|_| RgbImage::from_pixel(64, 64, image::Rgb([9, 9, 9]))).collect();
        let g = make_grid(&imgs, 3, 2);
        let l = with_column_labels(&g, &["t=1000".into(), "t=500".into(), "t=0".into()], 64, 2);
        assert_eq!((l.width(), l.height()), (g.width(), g.height() + LABEL_BAND));
        assert_eq!(l.get_pixel(10, LABEL_BAND + 10).0, [9, 9, 9]);
        let white = (0..LABEL_BAND).flat_map(|y| (0..l.width()).map(move |x| (x, y))).filter(|&(x, y)| l.get_pixel(x, y).0 == [255; 3]).count();
        assert!(white > 50, "labels drawn: {white} white pixels");
    }

    #[test]
    fn pixel_mapping() {
        let t = Tensor::from_vec(vec![-1f32, 0.0, 1.0], (1, 3, 1, 1), &candle_core::Device::Cpu).unwrap();
        let imgs = tensor_to_images(&t).unwrap();
        assert_eq!(imgs[0].get_pixel(0, 0).0, [0, 128, 255]);
    }
}
