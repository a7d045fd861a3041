//! TensorBoard event files, written by hand: TFRecord framing and a few protobuf messages.
//!
//! A record is `u64 length (LE) | u32 masked_crc32c(length) | data | u32 masked_crc32c(data)`,
//! and each `data` is an `Event` protobuf:
//!
//! ```text
//! Event   { wall_time: double = 1; step: int64 = 2; file_version: string = 3;
//!           summary: Summary = 5; session_log: SessionLog = 6 }
//! Summary { repeated Value value = 1 }
//! Value   { tag: string = 1; simple_value: float = 2; image: Image = 4 }
//! Image   { height: int32 = 1; width: int32 = 2; colorspace: int32 = 3; encoded_image_string: bytes = 4 }
//! SessionLog { status: enum = 1 }   (START = 1: TensorBoard drops events at or after this step
//!                                    from earlier files, so a resumed run does not show twice)
//! ```

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::TrainError;

const CRC32C_POLY: u32 = 0x82F6_3B78; // reversed Castagnoli polynomial

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ CRC32C_POLY } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC32C_TABLE: [u32; 256] = crc32c_table();

/// CRC-32C (Castagnoli), as TFRecord uses.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One TFRecord: framing around `data`.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// Parses a stream of TFRecords, checking both CRCs; returns the payloads.
pub fn parse_records(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 12 {
            return Err("truncated record header".into());
        }
        let len_bytes = &bytes[..8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        if crc != masked_crc32c(len_bytes) {
            return Err("bad length crc".into());
        }
        if bytes.len() < 12 + len + 4 {
            return Err("truncated record".into());
        }
        let data = &bytes[12..12 + len];
        let dcrc = u32::from_le_bytes(bytes[12 + len..16 + len].try_into().unwrap());
        if dcrc != masked_crc32c(data) {
            return Err("bad data crc".into());
        }
        out.push(data.to_vec());
        bytes = &bytes[16 + len..];
    }
    Ok(out)
}

// --- protobuf encoding -------------------------------------------------------------------

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, ((field as u64) << 3) | wire as u64);
}

fn field_varint(out: &mut Vec<u8>, field: u32, v: u64) {
    key(out, field, 0);
    varint(out, v);
}

fn field_f64(out: &mut Vec<u8>, field: u32, v: f64) {
    key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn field_f32(out: &mut Vec<u8>, field: u32, v: f32) {
    key(out, field, 5);
    out.extend_from_slice(&v.to_le_bytes());
}

fn field_bytes(out: &mut Vec<u8>, field: u32, v: &[u8]) {
    key(out, field, 2);
    varint(out, v.len() as u64);
    out.extend_from_slice(v);
}

/// What one event carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    FileVersion,
    Scalar { tag: String, value: f32 },
    /// A PNG image.
    Image { tag: String, width: u32, height: u32, png: Vec<u8> },
    /// SessionLog START.
    SessionStart,
}

/// Encodes an `Event` message.
pub fn encode_event(wall_time: f64, step: i64, payload: &Payload) -> Vec<u8> {
    let mut ev = Vec::new();
    field_f64(&mut ev, 1, wall_time);
    field_varint(&mut ev, 2, step as u64);
    match payload {
        Payload::FileVersion => field_bytes(&mut ev, 3, b"brain.Event:2"),
        Payload::Scalar { tag, value } => {
            let mut v = Vec::new();
            field_bytes(&mut v, 1, tag.as_bytes());
            field_f32(&mut v, 2, *value);
            let mut summary = Vec::new();
            field_bytes(&mut summary, 1, &v);
            field_bytes(&mut ev, 5, &summary);
        }
        Payload::Image { tag, width, height, png } => {
            let mut img = Vec::new();
            field_varint(&mut img, 1, *height as u64);
            field_varint(&mut img, 2, *width as u64);
            field_varint(&mut img, 3, 3); // RGB
            field_bytes(&mut img, 4, png);
            let mut v = Vec::new();
            field_bytes(&mut v, 1, tag.as_bytes());
            field_bytes(&mut v, 4, &img);
            let mut summary = Vec::new();
            field_bytes(&mut summary, 1, &v);
            field_bytes(&mut ev, 5, &summary);
        }
        Payload::SessionStart => {
            let mut s = Vec::new();
            field_varint(&mut s, 1, 1);
            field_bytes(&mut ev, 6, &s);
        }
    }
    ev
}

/// A decoded protobuf field (enough to read our own events back in tests).
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    Varint(u64),
    F64(f64),
    F32(f32),
    Bytes(Vec<u8>),
}

/// Splits a protobuf message into `(field number, value)` pairs.
pub fn decode_fields(mut b: &[u8]) -> Result<Vec<(u32, Field)>, String> {
    fn read_varint(b: &mut &[u8]) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first().ok_or("truncated varint")?;
            *b = rest;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let k = read_varint(&mut b)?;
        let (field, wire) = ((k >> 3) as u32, (k & 7) as u8);
        let value = match wire {
            0 => Field::Varint(read_varint(&mut b)?),
            1 => {
                let (x, rest) = b.split_at_checked(8).ok_or("truncated double")?;
                b = rest;
                Field::F64(f64::from_le_bytes(x.try_into().unwrap()))
            }
            5 => {
                let (x, rest) = b.split_at_checked(4).ok_or("truncated float")?;
                b = rest;
                Field::F32(f32::from_le_bytes(x.try_into().unwrap()))
            }
            2 => {
                let n = read_varint(&mut b)? as usize;
                let (x, rest) = b.split_at_checked(n).ok_or("truncated bytes")?;
                b = rest;
                Field::Bytes(x.to_vec())
            }
            w => return Err(format!("unsupported wire type {w}")),
        };
        out.push((field, value));
    }
    Ok(out)
}

/// Appends events to `<dir>/events.out.tfevents.<unix time>.<host>`.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// A new event file in `dir`; with `resume_step`, a SessionLog START at that step so that
    /// TensorBoard discards what earlier files logged after it.
    pub fn create(dir: &Path, resume_step: Option<u64>) -> Result<Self, TrainError> {
        unet::weights::create_dir_all(dir).map_err(|e| TrainError::io("cannot create", dir, e))?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let host = hostname();
        let mut path = dir.join(format!("events.out.tfevents.{}.{host}", now.as_secs()));
        let mut k = 1;
        while path.exists() {
            path = dir.join(format!("events.out.tfevents.{}.{host}.{k}", now.as_secs()));
            k += 1;
        }
        let f = File::create(&path).map_err(|e| TrainError::io("cannot create", &path, e))?;
        let mut w = Self { path, out: BufWriter::new(f) };
        w.write(0, &Payload::FileVersion)?;
        if let Some(s) = resume_step {
            w.write(s, &Payload::SessionStart)?;
        }
        w.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, step: u64, payload: &Payload) -> Result<(), TrainError> {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let data = encode_event(wall, step as i64, payload);
        self.out.write_all(&record(&data)).map_err(|e| TrainError::io("cannot write", &self.path, e))
    }

    pub fn scalar(&mut self, step: u64, tag: &str, value: f64) -> Result<(), TrainError> {
        self.write(step, &Payload::Scalar { tag: tag.into(), value: value as f32 })
    }

    pub fn image(&mut self, step: u64, tag: &str, img: &image::RgbImage) -> Result<(), TrainError> {
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .map_err(|e| TrainError::Invalid(format!("cannot encode PNG: {e}")))?;
        self.write(step, &Payload::Image { tag: tag.into(), width: img.width(), height: img.height(), png })
    }

    pub fn flush(&mut self) -> Result<(), TrainError> {
        self.out.flush().map_err(|e| TrainError::io("cannot write", &self.path, e))
    }
}

fn hostname() -> String {
    let raw = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_else(|| "localhost".into());
    let h: String = raw.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.').collect();
    if h.is_empty() {
        "localhost".into()
    } else {
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vectors() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        let m = masked_crc32c(b"123456789");
        // The TFRecord definition, spelled out.
        let c = 0xE306_9283u32;
        #[allow(clippy::manual_rotate)]
        let spec = ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8);
        assert_eq!(m, spec);
    }

    #[test]
    fn event_record_round_trip() {
        let ev = encode_event(1.5, 42, &Payload::Scalar { tag: "train/loss".into(), value: 0.25 });
        let mut stream = record(&encode_event(1.0, 0, &Payload::FileVersion));
        stream.extend(record(&ev));
        let recs = parse_records(&stream).unwrap();
        assert_eq!(recs.len(), 2);
        let f0 = decode_fields(&recs[0]).unwrap();
        assert_eq!(f0[2], (3, Field::Bytes(b"brain.Event:2".to_vec())));
        let f = decode_fields(&recs[1]).unwrap();
        assert_eq!(f[0], (1, Field::F64(1.5)));
        assert_eq!(f[1], (2, Field::Varint(42)));
        let Field::Bytes(summary) = &f[2].1 else { panic!("summary") };
        assert_eq!(f[2].0, 5);
        let s = decode_fields(summary).unwrap();
        let Field::Bytes(value) = &s[0].1 else { panic!("value") };
        let v = decode_fields(value).unwrap();
        assert_eq!(v, vec![(1, Field::Bytes(b"train/loss".to_vec())), (2, Field::F32(0.25))]);
        // A flipped bit is caught.
        let mut bad = stream.clone();
        let n = bad.len();
        bad[n - 6] ^= 1;
        assert!(parse_records(&bad).is_err());
    }

    #[test]
    fn image_event_and_writer() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), Some(7)).unwrap();
        w.scalar(8, "a", 1.0).unwrap();
        w.image(8, "grid", &image::RgbImage::from_pixel(3, 2, image::Rgb([1, 2, 3]))).unwrap();
        w.flush().unwrap();
        let recs = parse_records(&std::fs::read(w.path()).unwrap()).unwrap();
        assert_eq!(recs.len(), 4);
        let f = decode_fields(&recs[1]).unwrap();
        assert_eq!(f[2].0, 6, "session log");
        let f = decode_fields(&recs[3]).unwrap();
        let Field::Bytes(summary) = &f[2].1 else { panic!() };
        let Field::Bytes(value) = &decode_fields(summary).unwrap()[0].1 else { panic!() };
        let v = decode_fields(value).unwrap();
        let Field::Bytes(img) = &v[1].1 else { panic!() };
        let img = decode_fields(img).unwrap();
        assert_eq!(img[0], (1, Field::Varint(2)));
        assert_eq!(img[1], (2, Field::Varint(3)));
        let Field::Bytes(png) = &img[3].1 else { panic!() };
        assert_eq!(&png[1..4], b"PNG");
    }
}
