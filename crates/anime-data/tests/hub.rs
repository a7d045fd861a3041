//! `prepare_from_parquet` on small parquet files written here (feature `hub`; the hub itself
//! cannot be reached from tests).
#![cfg(feature = "hub")]

use std::path::Path;
use std::sync::Arc;

use anime_data::hub::prepare_from_parquet;
use anime_data::{synthetic_faces, PackedDataset, PrepareOptions};
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

fn png(seed: u64, size: usize) -> Vec<u8> {
    let img = synthetic_faces(1, size, seed).remove(0);
    let mut buf = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png).unwrap();
    buf
}

fn jpeg(seed: u64, size: usize) -> Vec<u8> {
    let img = synthetic_faces(1, size, seed).remove(0);
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 90).encode_image(&img).unwrap();
    buf
}

/// Writes byte-array columns given as (values, definition levels) in schema order.
fn write(path: &Path, schema: &str, columns: Vec<(Vec<ByteArray>, Vec<i16>)>) {
    let schema = Arc::new(parse_message_type(schema).unwrap());
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, schema, Arc::new(WriterProperties::builder().build())).unwrap();
    let mut rg = writer.next_row_group().unwrap();
    let mut columns = columns.into_iter();
    while let Some(mut col) = rg.next_column().unwrap() {
        let (values, defs) = columns.next().expect("a column per leaf");
        col.typed::<ByteArrayType>().write_batch(&values, Some(&defs), None).unwrap();
        col.close().unwrap();
    }
    rg.close().unwrap();
    writer.close().unwrap();
}

#[test]
fn prepare_from_parquet_struct_and_binary_columns() {
    let tmp = tempfile::tempdir().unwrap();
    // HF `datasets` layout: image: struct<bytes: binary, path: string>.
    let structs = tmp.path().join("train-00000-of-00001.parquet");
    let bytes = vec![jpeg(1, 100), png(2, 90), b"not an image".to_vec(), jpeg(4, 120)];
    // Row 2's bytes are junk; row 4 has a null struct; paths: a.jpg, b.png, c.jpg, (none), (none: null bytes row).
    let mut values = Vec::new();
    let mut defs = Vec::new();
    for b in &bytes {
        values.push(ByteArray::from(b.clone()));
        defs.push(2);
    }
    defs.push(0); // null image
    let paths: Vec<ByteArray> = ["a.jpg", "b.png", "c.jpg"].iter().map(|p| ByteArray::from(*p)).collect();
    let path_defs = vec![2, 2, 2, 1, 0];
    write(
        &structs,
        "message schema { optional group image { optional binary bytes; optional binary path (UTF8); } optional binary label (UTF8); }",
        vec![(values, defs), (paths, path_defs), (vec![ByteArray::from("x"); 5], vec![1; 5])],
    );
    // Plain binary column.
    let plain = tmp.path().join("plain.parquet");
    write(
        &plain,
        "message schema { required binary image; }",
        vec![(vec![ByteArray::from(png(5, 64)), ByteArray::from(jpeg(6, 30))], vec![0, 0])],
    );

    let out = tmp.path().join("out");
    let opts = PrepareOptions::new(tmp.path().join("unused"), &out);
    let report = prepare_from_parquet(&[structs.clone(), plain.clone()], &opts, false).unwrap();
    println!("{report}");
    assert_eq!(report.inputs, 7);
    assert_eq!((report.processed, report.upscaled), (5, 1));
    let skipped: Vec<(&str, &str)> = report.skipped.iter().map(|s| (s.name.as_str(), s.reason.as_str())).collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(skipped.iter().any(|(n, r)| *n == "train-00000-of-00001.parquet#2" && r.contains("not an image")));
    assert!(skipped.iter().any(|(n, r)| *n == "train-00000-of-00001.parquet#4" && r.contains("no image bytes")));

    let ds = PackedDataset::load(&out.join("packed.safetensors")).unwrap();
    let expected = ["a.jpg", "b.png", "plain-000000.png", "plain-000001.jpg", "train-00000-of-00001-000003.jpg"];
    assert_eq!(ds.names(), &expected.map(String::from)[..]);
    for (i, name) in expected.iter().enumerate() {
        let img = image::open(out.join("images").join(name)).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (64, 64));
        assert_eq!(ds.image_pixels(i), img.as_raw().as_slice());
    }

    // Re-run: reused; limit counts rows.
    let report = prepare_from_parquet(&[structs.clone(), plain.clone()], &opts, false).unwrap();
    assert_eq!((report.processed, report.reused), (0, 5));
    let mut opts = opts.clone();
    opts.limit = Some(2);
    let report = prepare_from_parquet(&[structs, plain], &opts, false).unwrap();
    assert_eq!(report.packed, 2);

    // Not a parquet file / no image column: clear errors.
    let bad = tmp.path().join("bad.parquet");
    std::fs::write(&bad, b"nope").unwrap();
    let e = prepare_from_parquet(std::slice::from_ref(&bad), &opts, false).unwrap_err();
    assert!(e.to_string().contains("bad.parquet"), "{e}");
    let noimg = tmp.path().join("noimg.parquet");
    write(&noimg, "message schema { required binary text; }", vec![(vec![ByteArray::from("x")], vec![0])]);
    let e = prepare_from_parquet(&[noimg], &opts, false).unwrap_err();
    assert!(e.to_string().contains("no 'image' column"), "{e}");
}
