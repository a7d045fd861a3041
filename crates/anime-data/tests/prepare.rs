//! `prepare` end to end on a temporary folder mixing good images with every kind of bad input.

use std::collections::BTreeMap;
use std::path::Path;

use anime_data::{prepare, synthetic_faces, Crop, DataError, PackedDataset, PrepareOptions, KAGGLE_URL};
use image::{DynamicImage, GenericImageView, ImageFormat, RgbImage};

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut buf = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut buf), format).unwrap();
    buf
}

fn jpeg(img: &RgbImage) -> Vec<u8> {
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 90).encode_image(img).unwrap();
    buf
}

/// A face of `w x h` (a synthetic face resized to that shape).
fn face(w: u32, h: u32, seed: u64) -> RgbImage {
    let f = synthetic_faces(1, 128, seed).remove(0);
    image::imageops::resize(&f, w, h, image::imageops::FilterType::Triangle)
}

/// Sets the dimensions in the SOF0 segment of a baseline JPEG (no checksum to fix).
fn patch_jpeg_dimensions(mut b: Vec<u8>, w: u16, h: u16) -> Vec<u8> {
    let sof = b.windows(2).position(|m| m == [0xFF, 0xC0]).expect("baseline JPEG");
    b[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    b[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    b
}

/// The mixed input folder; returns the output names of the good inputs, sorted.
fn make_raw(dir: &Path) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let w = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).unwrap();
    let mut good = Vec::new();
    let mut ok = |name: &str| good.push(name.to_string());

    // Good JPEGs of Kaggle-like sizes, square and not.
    for (i, &(wd, ht)) in [(96, 96), (120, 120), (90, 90), (110, 97), (85, 118)].iter().enumerate() {
        let name = format!("{}_2004.jpg", 100 + i);
        w(&name, &jpeg(&face(wd, ht, i as u64)));
        ok(&name);
    }
    // Bad inputs.
    w("200_empty.jpg", b"");
    let full = jpeg(&face(100, 100, 9));
    w("201_truncated.jpg", &full[..full.len() / 2]);
    w("202_text.jpg", b"this is not an image, just some text\n");
    w("203_notes.txt", b"some notes");
    w("204_huge.jpg", &patch_jpeg_dimensions(jpeg(&face(64, 64, 3)), 60000, 60000));
    let mut bmp = encode(&DynamicImage::ImageRgb8(face(8, 8, 1)), ImageFormat::Bmp);
    bmp[18..22].copy_from_slice(&30000i32.to_le_bytes()); // width
    bmp[22..26].copy_from_slice(&30000i32.to_le_bytes()); // height
    w("205_huge.bmp", &bmp);
    w("206_garbage.png", &[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, 1, 2, 3]);
    // Accepted non-JPEG and odd inputs.
    let mut rgba = DynamicImage::ImageRgb8(face(100, 100, 4)).to_rgba8();
    for y in 0..100 {
        for x in 0..50 {
            rgba.get_pixel_mut(x, y).0[3] = 0; // left half transparent -> white
        }
    }
    w("300_rgba.png", &encode(&DynamicImage::ImageRgba8(rgba), ImageFormat::Png));
    ok("300_rgba.png");
    let la = DynamicImage::ImageRgb8(face(90, 90, 5)).to_luma_alpha8();
    w("301_la.png", &encode(&DynamicImage::ImageLumaA8(la), ImageFormat::Png));
    ok("301_la.png");
    let gray = DynamicImage::ImageRgb8(face(100, 100, 6)).to_luma8();
    w("302_gray.jpg", &encode(&DynamicImage::ImageLuma8(gray), ImageFormat::Jpeg));
    ok("302_gray.jpg");
    let rgb16 = DynamicImage::ImageRgb8(face(100, 100, 7)).to_rgb16();
    w("303_16bit.png", &encode(&DynamicImage::ImageRgb16(rgb16), ImageFormat::Png));
    ok("303_16bit.png");
    // CMYK JPEG (Adobe), a uniform colour.
    let mut cmyk_bytes = Vec::new();
    let cmyk: Vec<u8> = [10u8, 200, 30, 0].repeat(96 * 96);
    jpeg_encoder::Encoder::new(&mut cmyk_bytes, 95)
        .encode(&cmyk, 96, 96, jpeg_encoder::ColorType::Cmyk)
        .unwrap();
    w("304_cmyk.jpg", &cmyk_bytes);
    ok("304_cmyk.jpg");
    w("305_anim.gif", &encode(&DynamicImage::ImageRgb8(face(100, 100, 8)).to_rgba8().into(), ImageFormat::Gif));
    ok("305_anim.png");
    w("306_win.bmp", &encode(&DynamicImage::ImageRgb8(face(100, 90, 9)), ImageFormat::Bmp));
    ok("306_win.png");
    w("307_web.webp", &encode(&DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(face(100, 100, 10)).to_rgba8()), ImageFormat::WebP));
    ok("307_web.png");
    w("308_tiny.jpg", &jpeg(&face(30, 30, 11)));
    ok("308_tiny.jpg");
    // A PNG named .jpg: content decides the decoder, the name decides the output format.
    w("309_png_named.jpg", &encode(&DynamicImage::ImageRgb8(face(100, 100, 12)), ImageFormat::Png));
    ok("309_png_named.jpg");
    // Two inputs that map to one output name: the .png keeps it, the .bmp is skipped.
    w("310_dup.png", &encode(&DynamicImage::ImageRgb8(face(64, 64, 13)), ImageFormat::Png));
    ok("310_dup.png");
    w("310_dup.bmp", &encode(&DynamicImage::ImageRgb8(face(64, 64, 14)), ImageFormat::Bmp));
    // A subfolder is not looked into, and is listed as skipped.
    std::fs::create_dir_all(dir.join("subdir")).unwrap();
    std::fs::write(dir.join("subdir/ignored.jpg"), jpeg(&face(64, 64, 1))).unwrap();
    good.sort();
    good
}

const BAD: &[(&str, &str)] = &[
    ("200_empty.jpg", "empty file"),
    ("201_truncated.jpg", "truncated"),
    ("202_text.jpg", "not an image"),
    ("203_notes.txt", "not an image file (extension .txt)"),
    ("204_huge.jpg", "too large"),
    ("205_huge.bmp", "too large"),
    ("206_garbage.png", "Png"),
    ("310_dup.bmp", "already taken by 310_dup.png"),
    ("subdir", "a folder"),
];

fn options(raw: &Path, out: &Path) -> PrepareOptions {
    PrepareOptions::new(raw, out)
}

fn list_dir(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn prepare_mixed_folder_skips_bad_inputs_and_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    let out = tmp.path().join("out");
    let good = make_raw(&raw);

    let report = prepare(&options(&raw, &out), false).unwrap();
    println!("{report}");
    assert_eq!(report.processed, good.len(), "{report}");
    assert_eq!(report.reused, 0);
    assert_eq!(report.upscaled, 1, "only the 30x30 input is smaller than 64");
    assert_eq!(report.packed, good.len());
    assert_eq!(report.inputs, good.len() + BAD.len());
    let skipped: BTreeMap<&str, &str> = report.skipped.iter().map(|s| (s.name.as_str(), s.reason.as_str())).collect();
    assert_eq!(skipped.len(), BAD.len(), "{skipped:#?}");
    for (name, reason) in BAD {
        let got = skipped.get(name).unwrap_or_else(|| panic!("{name} not skipped: {skipped:#?}"));
        assert!(got.contains(reason), "{name}: reason '{got}' should mention '{reason}'");
    }
    // skipped.txt names every skipped file; the summary too.
    let listed = std::fs::read_to_string(out.join("skipped.txt")).unwrap();
    for (name, _) in BAD {
        assert!(listed.lines().any(|l| l.starts_with(&format!("{name}\t"))), "{name} missing from skipped.txt");
    }
    let summary = report.to_string();
    assert!(summary.contains("201_truncated.jpg: truncated"), "{summary}");

    // Exactly the good outputs, all 64x64 RGB, no temporaries.
    assert_eq!(list_dir(&out.join("images")), good);
    for name in &good {
        let img = image::open(out.join("images").join(name)).unwrap();
        assert_eq!(img.dimensions(), (64, 64), "{name}");
        let expected = if name.ends_with(".jpg") { ImageFormat::Jpeg } else { ImageFormat::Png };
        assert_eq!(image::ImageFormat::from_path(name).unwrap(), expected);
        let bytes = std::fs::read(out.join("images").join(name)).unwrap();
        assert_eq!(image::guess_format(&bytes).unwrap(), expected, "{name} content");
    }

    // The packed file round-trips and holds the outputs' pixels, in name order.
    let ds = PackedDataset::load(&out.join("packed.safetensors")).unwrap();
    assert_eq!(ds.names(), &good[..]);
    assert_eq!((ds.len(), ds.size()), (good.len(), 64));
    for (i, name) in good.iter().enumerate() {
        let img = image::open(out.join("images").join(name)).unwrap().to_rgb8();
        assert_eq!(ds.image_pixels(i), img.as_raw().as_slice(), "{name}");
    }
    // RGBA: the transparent left half became white.
    let i = good.iter().position(|n| n == "300_rgba.png").unwrap();
    assert_eq!(ds.image(i).get_pixel(5, 30).0, [255, 255, 255]);
    // Grayscale stays gray in RGB.
    let i = good.iter().position(|n| n == "302_gray.jpg").unwrap();
    assert!(ds.image(i).pixels().all(|p| p.0[0].abs_diff(p.0[1]) <= 2 && p.0[1].abs_diff(p.0[2]) <= 2));
    // CMYK: a uniform colour stays uniform and is not black/white garbage.
    let i = good.iter().position(|n| n == "304_cmyk.jpg").unwrap();
    let p = ds.image(i).get_pixel(32, 32).0;
    assert!(ds.image(i).pixels().all(|q| q.0.iter().zip(p).all(|(&a, b)| a.abs_diff(b) <= 3)), "cmyk not uniform");
    println!("cmyk pixel {p:?}");
    // Also readable by candle's safetensors loader.
    let tensors = candle_core::safetensors::load(out.join("packed.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(tensors["images"].dims(), &[good.len(), 64, 64, 3]);
    assert_eq!(tensors["images"].dtype(), candle_core::DType::U8);
    let packed1 = std::fs::read(out.join("packed.safetensors")).unwrap();

    // Second run: everything reused, same packed file.
    let report = prepare(&options(&raw, &out), false).unwrap();
    assert_eq!((report.processed, report.reused, report.skipped.len()), (0, good.len(), BAD.len()));
    assert_eq!(std::fs::read(out.join("packed.safetensors")).unwrap(), packed1);

    // An input newer than its output is redone, alone.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(raw.join("100_2004.jpg"), jpeg(&face(100, 100, 42))).unwrap();
    let report = prepare(&options(&raw, &out), false).unwrap();
    assert_eq!((report.processed, report.reused), (1, good.len() - 1));
    // A damaged output is redone.
    std::fs::write(out.join("images/101_2004.jpg"), b"junk").unwrap();
    let report = prepare(&options(&raw, &out), false).unwrap();
    assert_eq!((report.processed, report.reused), (1, good.len() - 1));
    let packed2 = std::fs::read(out.join("packed.safetensors")).unwrap();
    assert_ne!(packed2, packed1);

    // --force redoes everything, deterministically.
    let mut opts = options(&raw, &out);
    opts.force = true;
    let report = prepare(&opts, false).unwrap();
    assert_eq!((report.processed, report.reused), (good.len(), 0));
    assert_eq!(std::fs::read(out.join("packed.safetensors")).unwrap(), packed2);
    assert!(!list_dir(&out.join("images")).iter().any(|n| n.ends_with(".tmp")));

    // A different size invalidates the outputs (settings stamp), limit takes the first N.
    let mut opts = options(&raw, &out);
    opts.size = 32;
    opts.limit = Some(3);
    let report = prepare(&opts, false).unwrap();
    assert_eq!((report.processed, report.reused, report.packed), (3, 0, 3));
    let ds = PackedDataset::load(&out.join("packed.safetensors")).unwrap();
    assert_eq!(ds.size(), 32);
    assert_eq!(ds.names(), &good[..3]);
    // The other outputs of the full run are still in images/: reported, not packed, kept.
    assert_eq!(report.stale, good.len() - 3);
    assert!(report.to_string().contains("come from no input of this run"), "{report}");
    assert_eq!(list_dir(&out.join("images")).len(), good.len());
}

#[test]
fn center_crop_cuts_the_sides() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    // 160x100: red 20 px bands left and right, green in the middle. The centre square is
    // x in 30..130; like Pillow's `resize(box=...)` the filter may read a few pixels beyond it.
    let img = RgbImage::from_fn(160, 100, |x, _| if !(20..140).contains(&x) { image::Rgb([255, 0, 0]) } else { image::Rgb([0, 255, 0]) });
    std::fs::write(raw.join("wide.png"), encode(&DynamicImage::ImageRgb8(img), ImageFormat::Png)).unwrap();
    let mut opts = options(&raw, &tmp.path().join("center"));
    opts.crop = Crop::Center;
    prepare(&opts, false).unwrap();
    let ds = PackedDataset::load(&tmp.path().join("center/packed.safetensors")).unwrap();
    assert!(ds.image(0).pixels().all(|p| p.0 == [0, 255, 0]), "center crop keeps only the green square");
    let opts = options(&raw, &tmp.path().join("stretch"));
    prepare(&opts, false).unwrap();
    let ds = PackedDataset::load(&tmp.path().join("stretch/packed.safetensors")).unwrap();
    assert_eq!(ds.image(0).get_pixel(0, 10).0, [255, 0, 0], "no crop keeps the red bands (squeezed)");
}

#[test]
fn missing_or_empty_raw_folder_is_a_one_line_error_with_the_kaggle_url() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let missing = prepare(&options(&tmp.path().join("nope"), &out), false).unwrap_err();
    let empty_dir = tmp.path().join("empty");
    std::fs::create_dir_all(&empty_dir).unwrap();
    let empty = prepare(&options(&empty_dir, &out), false).unwrap_err();
    let parent = tmp.path().join("raw");
    std::fs::create_dir_all(parent.join("images")).unwrap();
    let nested = prepare(&options(&parent, &out), false).unwrap_err();
    assert!(matches!(missing, DataError::RawMissing { .. }));
    assert!(matches!(empty, DataError::RawEmpty { .. }));
    assert!(nested.to_string().contains("did you mean --raw"), "{nested}");
    for e in [missing, empty, nested] {
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains(KAGGLE_URL), "{msg}");
        assert!(msg.contains("dataset/anime/raw/images"), "{msg}");
    }
    // A file where the folder should be: said so, not "not found".
    let file = tmp.path().join("one.png");
    std::fs::write(&file, b"x").unwrap();
    let e = prepare(&options(&file, &out), false).unwrap_err().to_string();
    assert!(e.contains("is a file") && !e.contains("not found"), "{e}");
    // Only bad files: nothing to pack is an error too, after writing skipped.txt.
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("a.jpg"), b"").unwrap();
    let err = prepare(&options(&bad, &out), false).unwrap_err();
    assert!(matches!(err, DataError::NothingToPack { .. }), "{err}");
    assert!(out.join("skipped.txt").exists());
}

#[test]
fn packed_load_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x.safetensors");
    let e = PackedDataset::load(&p).unwrap_err();
    assert!(matches!(e, DataError::PackedMissing { .. }) && e.to_string().contains("prepare-data"), "{e}");
    std::fs::write(&p, b"hello").unwrap();
    let e = PackedDataset::load(&p).unwrap_err();
    assert!(matches!(e, DataError::NotPacked { .. }), "{e}");
    // Wrong dtype / shape.
    let t = candle_core::Tensor::zeros((2, 4, 4, 3), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("images".to_string(), t)]), &p).unwrap();
    let e = PackedDataset::load(&p).unwrap_err();
    assert!(e.to_string().contains("dtype"), "{e}");
    let t = candle_core::Tensor::zeros((2, 4, 5, 3), candle_core::DType::U8, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("images".to_string(), t)]), &p).unwrap();
    let e = PackedDataset::load(&p).unwrap_err();
    assert!(e.to_string().contains("shape"), "{e}");
    let t = candle_core::Tensor::zeros((2, 4), candle_core::DType::U8, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("other".to_string(), t)]), &p).unwrap();
    let e = PackedDataset::load(&p).unwrap_err();
    assert!(e.to_string().contains("no 'images' tensor"), "{e}");
    // A foreign u8 [N,S,S,3] file without metadata loads with index names.
    let t = candle_core::Tensor::zeros((2, 4, 4, 3), candle_core::DType::U8, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("images".to_string(), t)]), &p).unwrap();
    let ds = PackedDataset::load(&p).unwrap();
    assert_eq!(ds.names(), &["000000".to_string(), "000001".to_string()]);

    // from_images / save / load round trip; save is atomic (no temporary left).
    assert!(PackedDataset::from_images(vec!["a".into()], 4, vec![0; 47]).is_err());
    let px: Vec<u8> = (0..2 * 4 * 4 * 3).map(|i| i as u8).collect();
    let ds = PackedDataset::from_images(vec!["a.jpg".into(), "b \"q\".png".into()], 4, px.clone()).unwrap();
    ds.save(&p).unwrap();
    let back = PackedDataset::load(&p).unwrap();
    assert_eq!(back.names(), ds.names());
    assert_eq!(back.pixels(), &px[..]);
    assert_eq!(back.size(), 4);
    assert!(!back.is_empty());
    assert_eq!(list_dir(tmp.path()), vec!["x.safetensors".to_string()]);
    // One flipped pixel bit is found (nothing else would notice it).
    let mut bytes = std::fs::read(&p).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&p, &bytes).unwrap();
    let e = PackedDataset::load(&p).unwrap_err().to_string();
    assert!(e.contains("pixel checksum") && e.contains("prepare-data again") && !e.contains('\n'), "{e}");
}

#[test]
fn an_out_folder_whose_images_are_the_raw_folder_is_refused() {
    // The Kaggle layout is raw/images: `--out raw` would resize the originals in place.
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw").join("images");
    std::fs::create_dir_all(&raw).unwrap();
    face(96, 96, 1).save(raw.join("a.png")).unwrap();
    let before = std::fs::read(raw.join("a.png")).unwrap();
    let e = prepare(&options(&raw, &tmp.path().join("raw")), false).unwrap_err().to_string();
    assert!(e.contains("over the raw ones") && !e.contains('\n'), "{e}");
    // The same through another spelling of the path.
    let other = tmp.path().join("raw").join(".").join("images").join("..");
    assert!(prepare(&options(&raw, &other), false).is_err());
    assert_eq!(std::fs::read(raw.join("a.png")).unwrap(), before);
    assert_eq!(std::fs::read_dir(&raw).unwrap().count(), 1);
}

#[cfg(unix)]
#[test]
fn an_out_folder_that_is_a_link_to_nothing_is_named_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    face(96, 96, 1).save(raw.join("a.png")).unwrap();
    let out = tmp.path().join("out");
    std::os::unix::fs::symlink(tmp.path().join("unmounted"), &out).unwrap();
    let e = prepare(&options(&raw, &out), false).unwrap_err().to_string();
    assert!(e.contains("link to a missing folder") && !e.contains('\n'), "{e}");
    // A link to an existing folder is an ordinary --out.
    std::fs::create_dir(tmp.path().join("unmounted")).unwrap();
    prepare(&options(&raw, &out), false).unwrap();
    assert!(tmp.path().join("unmounted").join("packed.safetensors").is_file());
}

#[cfg(unix)]
#[test]
fn a_name_that_is_not_utf8_is_read_and_a_broken_link_is_listed() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    // "café.jpg" in Latin-1, as names from an old zip archive come out.
    let latin1 = std::ffi::OsStr::from_bytes(b"caf\xe9.jpg");
    std::fs::write(raw.join(latin1), jpeg(&face(96, 96, 1))).unwrap();
    std::os::unix::fs::symlink(raw.join("missing.jpg"), raw.join("dangling.jpg")).unwrap();
    let out = tmp.path().join("out");
    let report = prepare(&options(&raw, &out), false).unwrap();
    assert_eq!((report.inputs, report.processed, report.packed), (2, 1, 1), "{report:?}");
    let reasons: Vec<_> = report.skipped.iter().map(|s| (s.name.as_str(), s.reason.as_str())).collect();
    assert_eq!(reasons, [("dangling.jpg", "a broken link: its target is missing")]);
    let listed = std::fs::read_to_string(out.join("skipped.txt")).unwrap();
    assert!(listed.contains("dangling.jpg\ta broken link"), "{listed}");
}
