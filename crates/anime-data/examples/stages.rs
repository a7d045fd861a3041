//! Times the stages of preparing one image (decode, resize, encode, decode back) on a folder
//! of JPEGs: `cargo run --release -p anime-data --example stages -- target/bench-data/raw-3000`.
//! Each stage runs 7 times over up to 1000 images; the best run is shown (the machine is shared).
use std::time::{Duration, Instant};

use anime_data::imaging::*;

fn best<T>(mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut out = None;
    for _ in 0..7 {
        let t = Instant::now();
        let r = f();
        best = best.min(t.elapsed());
        out = Some(r);
    }
    (best, out.unwrap())
}

fn zdec(b: &[u8]) -> Vec<u8> {
    let opts = zune_core::options::DecoderOptions::default().jpeg_set_out_colorspace(zune_core::colorspace::ColorSpace::RGB);
    let mut d = zune_jpeg::JpegDecoder::new_with_options(zune_core::bytestream::ZCursor::new(b), opts);
    d.decode().unwrap()
}

fn main() {
    let dir = std::env::args().nth(1).expect("folder");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    files.truncate(1000);
    let n = files.len() as f64;
    let mut rows = Vec::new();
    let (t, bytes) = best(|| files.iter().map(|p| std::fs::read(p).unwrap()).collect::<Vec<_>>());
    rows.push(("read", t));
    let (t, imgs) = best(|| bytes.iter().map(|b| decode_rgb(b, DEFAULT_MAX_PIXELS).unwrap()).collect::<Vec<_>>());
    rows.push(("decode (decode_rgb)", t));
    let (t, _) = best(|| bytes.iter().map(|b| zdec(b)).collect::<Vec<_>>());
    rows.push(("decode (zune direct)", t));
    let (t, small) = best(|| imgs.iter().map(|i| resize_rgb(i, (0, 0, i.width(), i.height()), 64, 64)).collect::<Vec<_>>());
    rows.push(("resize (ours)", t));
    let (t, _) = best(|| {
        imgs.iter().map(|i| image::imageops::resize(i, 64, 64, image::imageops::FilterType::CatmullRom)).collect::<Vec<_>>()
    });
    rows.push(("resize (image crate)", t));
    let (t, enc) = best(|| small.iter().map(|i| encode(i, OutputFormat::Jpeg).unwrap()).collect::<Vec<_>>());
    rows.push(("encode (encode())", t));
    let (t, enc_img) = best(|| {
        small
            .iter()
            .map(|i| {
                let mut v = Vec::new();
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut v, 100).encode_image(i).unwrap();
                v
            })
            .collect::<Vec<_>>()
    });
    rows.push(("encode (image crate q100)", t));
    let (t, _) = best(|| {
        small
            .iter()
            .map(|i| {
                let mut v = Vec::new();
                let mut e = jpeg_encoder::Encoder::new(&mut v, 100);
                e.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_4_4);
                e.encode(i.as_raw(), 64, 64, jpeg_encoder::ColorType::Rgb).unwrap();
                v
            })
            .collect::<Vec<_>>()
    });
    rows.push(("encode (jpeg-encoder q100 4:4:4)", t));
    let (t, _) = best(|| enc.iter().map(|b| image::load_from_memory_with_format(b, image::ImageFormat::Jpeg).unwrap()).collect::<Vec<_>>());
    rows.push(("decode back (image crate)", t));
    let (t, _) = best(|| enc.iter().map(|b| zdec(b)).collect::<Vec<_>>());
    rows.push(("decode back (zune direct)", t));
    let (t, _) = best(|| small.iter().map(|i| encode(i, OutputFormat::Png).unwrap()).collect::<Vec<_>>());
    rows.push(("encode png", t));
    let tmp = std::env::temp_dir().join("stages-out");
    std::fs::create_dir_all(&tmp).unwrap();
    let (t, _) = best(|| {
        for (i, b) in enc.iter().enumerate() {
            let p = tmp.join(format!("{i}.jpg"));
            let q = tmp.join(format!(".{i}.jpg.tmp"));
            std::fs::write(&q, b).unwrap();
            std::fs::rename(&q, &p).unwrap();
        }
    });
    rows.push(("write+rename", t));
    println!("sizes: encode() {} B, image crate {} B", enc[0].len(), enc_img[0].len());
    for (name, d) in rows {
        println!("{name:<34} {:>8.1} us/image", d.as_secs_f64() * 1e6 / n);
    }
}
