//! Image-parquet datasets (feature `hub`): local parquet files, or a dataset on the Hugging Face
//! hub fetched with `candle_datasets::hub::from_hub` (the hub's parquet conversion of a dataset,
//! e.g. `DrishtiSharma/Anime-Face-Dataset`).
//!
//! Each row's `image` column is either a struct `{bytes: binary, path: string}` (the layout the
//! `datasets` library writes for its `Image` feature) or plain binary. The bytes go through the
//! same decode/resize/encode/pack path as files in a folder ([`crate::prepare`]); only the
//! listing differs. Output names are the base names of `path` when present and unique, else
//! `<parquet file stem>-<row>.jpg|png` (by the bytes' format). The image bytes of all rows are
//! held in memory while preparing (~400 MB for a 63k-face set).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

use crate::prepare::{output_name, run, Source, SourceData};
use crate::{DataError, PrepareOptions, PrepareReport, Skipped};

/// One row's image: bytes and the `path` stored with them, if any.
struct Row {
    file_stem: String,
    label: String,
    row: usize,
    path: Option<String>,
    bytes: Option<Vec<u8>>,
}

fn field_bytes(f: &Field) -> Option<Vec<u8>> {
    match f {
        Field::Bytes(b) => Some(b.data().to_vec()),
        Field::Str(s) => Some(s.as_bytes().to_vec()),
        _ => None,
    }
}

/// Reads the `image` column of every row of one parquet file.
fn read_rows(reader: &dyn FileReader, label: &str, file_stem: &str, limit: usize, out: &mut Vec<Row>) -> Result<(), String> {
    let schema = reader.metadata().file_metadata().schema();
    if !schema.get_fields().iter().any(|f| f.name() == "image") {
        let cols: Vec<&str> = schema.get_fields().iter().map(|f| f.name()).collect();
        return Err(format!("no 'image' column (columns: {})", cols.join(", ")));
    }
    let rows = reader.get_row_iter(None).map_err(|e| e.to_string())?;
    for (i, row) in rows.enumerate() {
        if out.len() >= limit {
            break;
        }
        let row = row.map_err(|e| format!("row {i}: {e}"))?;
        let mut r = Row { file_stem: file_stem.to_string(), label: format!("{label}#{i}"), row: i, path: None, bytes: None };
        for (name, field) in row.get_column_iter() {
            if name != "image" {
                continue;
            }
            match field {
                Field::Group(g) => {
                    for (n, f) in g.get_column_iter() {
                        match (n.as_str(), f) {
                            ("bytes", f) => r.bytes = field_bytes(f),
                            ("path", Field::Str(p)) if !p.is_empty() => r.path = Some(p.clone()),
                            _ => {}
                        }
                    }
                }
                f => r.bytes = field_bytes(f),
            }
        }
        out.push(r);
    }
    Ok(())
}

/// Turns rows into sources with unique output names; rows without bytes become skips.
fn rows_to_sources(rows: Vec<Row>, skipped: &mut Vec<Skipped>) -> Vec<Source> {
    let base = |p: &str| p.rsplit(['/', '\\']).next().unwrap_or(p).to_string();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for r in &rows {
        if let Some(p) = &r.path {
            *counts.entry(base(p)).or_default() += 1;
        }
    }
    let mut sources = Vec::with_capacity(rows.len());
    for r in rows {
        let Some(bytes) = r.bytes else {
            skipped.push(Skipped { name: r.label, reason: "no image bytes in this row".into() });
            continue;
        };
        let name = match r.path.as_deref().map(base) {
            Some(b) if counts.get(&b) == Some(&1) && crate::imaging::extension(&b).is_some() => b,
            _ => {
                let ext = if image::guess_format(&bytes).ok() == Some(image::ImageFormat::Jpeg) { "jpg" } else { "png" };
                format!("{}-{:06}.{ext}", r.file_stem, r.row)
            }
        };
        sources.push(Source { input: r.label, output: output_name(&name), data: SourceData::Bytes(bytes) });
    }
    sources
}

fn prepare_readers(
    readers: Vec<(String, String, Box<dyn FileReader>)>,
    opts: &PrepareOptions,
    progress: bool,
    start: Instant,
    err: impl Fn(&str, String) -> DataError,
) -> Result<PrepareReport, DataError> {
    let limit = opts.limit.unwrap_or(usize::MAX);
    let mut rows = Vec::new();
    for (label, stem, reader) in &readers {
        read_rows(reader.as_ref(), label, stem, limit, &mut rows).map_err(|e| err(label, e))?;
    }
    if rows.is_empty() {
        return Err(DataError::Invalid("the parquet files hold no rows".into()));
    }
    let inputs = rows.len();
    let mut skipped = Vec::new();
    let sources = rows_to_sources(rows, &mut skipped);
    run(sources, &mut skipped, inputs, opts, progress, start)
}

fn stem(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into())
}

/// Prepares local image-parquet files (`opts.raw` is not used). Rows are taken in file order,
/// then row order; `opts.limit` counts rows.
pub fn prepare_from_parquet(files: &[PathBuf], opts: &PrepareOptions, progress: bool) -> Result<PrepareReport, DataError> {
    let start = Instant::now();
    if files.is_empty() {
        return Err(DataError::Invalid("no parquet files given".into()));
    }
    let mut readers: Vec<(String, String, Box<dyn FileReader>)> = Vec::new();
    for f in files {
        let file = File::open(f).map_err(|e| DataError::io("cannot open", f, e))?;
        let reader = SerializedFileReader::new(file)
            .map_err(|e| DataError::Parquet { path: f.clone(), reason: e.to_string() })?;
        let label = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        readers.push((label, stem(f), Box::new(reader)));
    }
    let paths: HashMap<String, PathBuf> =
        files.iter().map(|f| (f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), f.clone())).collect();
    prepare_readers(readers, opts, progress, start, |label, reason| DataError::Parquet {
        path: paths.get(label).cloned().unwrap_or_else(|| label.into()),
        reason,
    })
}

/// Downloads (or finds in the hub cache) the parquet files of `dataset` (e.g.
/// `DrishtiSharma/Anime-Face-Dataset`) with `candle_datasets::hub::from_hub`, then prepares them
/// like [`prepare_from_parquet`]. Needs network access to huggingface.co (or a filled cache).
pub fn prepare_from_hub(dataset: &str, opts: &PrepareOptions, progress: bool) -> Result<PrepareReport, DataError> {
    let start = Instant::now();
    let hub_err = |reason: String| DataError::Hub { dataset: dataset.to_string(), reason };
    let api = hf_hub::HFClientSync::new().map_err(|e| hub_err(e.to_string()))?;
    tracing::info!("fetching the parquet files of {dataset} from the Hugging Face hub");
    let files = candle_datasets::hub::from_hub(&api, dataset.to_string()).map_err(|e| hub_err(e.to_string()))?;
    if files.is_empty() {
        return Err(hub_err("no parquet files in the dataset's parquet conversion".into()));
    }
    let stem = dataset.rsplit('/').next().unwrap_or(dataset).to_string();
    let readers: Vec<(String, String, Box<dyn FileReader>)> = files
        .into_iter()
        .enumerate()
        .map(|(i, r)| (format!("{dataset}[{i}]"), format!("{stem}-{i}"), Box::new(r) as Box<dyn FileReader>))
        .collect();
    prepare_readers(readers, opts, progress, start, |label, reason| DataError::Hub { dataset: label.to_string(), reason })
}
