//! A tiny built-in 3x5 bitmap font for column labels (digits, upper-case letters and a few
//! symbols), so labelled strips need no font file.

use image::{Rgb, RgbImage};

fn glyph(c: char) -> Option<[&'static str; 5]> {
    Some(match c.to_ascii_uppercase() {
        '0' => ["###", "#.#", "#.#", "#.#", "###"],
        '1' => [".#.", "##.", ".#.", ".#.", "###"],
        '2' => ["###", "..#", "###", "#..", "###"],
        '3' => ["###", "..#", ".##", "..#", "###"],
        '4' => ["#.#", "#.#", "###", "..#", "..#"],
        '5' => ["###", "#..", "###", "..#", "###"],
        '6' => ["###", "#..", "###", "#.#", "###"],
        '7' => ["###", "..#", ".#.", ".#.", ".#."],
        '8' => ["###", "#.#", "###", "#.#", "###"],
        '9' => ["###", "#.#", "###", "..#", "###"],
        'A' => [".#.", "#.#", "###", "#.#", "#.#"],
        'B' => ["##.", "#.#", "##.", "#.#", "##."],
        'C' => [".##", "#..", "#..", "#..", ".##"],
        'D' => ["##.", "#.#", "#.#", "#.#", "##."],
        'E' => ["###", "#..", "##.", "#..", "###"],
        'F' => ["###", "#..", "##.", "#..", "#.."],
        'G' => [".##", "#..", "#.#", "#.#", ".##"],
        'H' => ["#.#", "#.#", "###", "#.#", "#.#"],
        'I' => ["###", ".#.", ".#.", ".#.", "###"],
        'J' => ["..#", "..#", "..#", "#.#", ".#."],
        'K' => ["#.#", "#.#", "##.", "#.#", "#.#"],
        'L' => ["#..", "#..", "#..", "#..", "###"],
        'M' => ["#.#", "###", "###", "#.#", "#.#"],
        'N' => ["##.", "#.#", "#.#", "#.#", "#.#"],
        'O' => [".#.", "#.#", "#.#", "#.#", ".#."],
        'P' => ["##.", "#.#", "##.", "#..", "#.."],
        'Q' => [".#.", "#.#", "#.#", "##.", ".##"],
        'R' => ["##.", "#.#", "##.", "#.#", "#.#"],
        'S' => [".##", "#..", ".#.", "..#", "##."],
        'T' => ["###", ".#.", ".#.", ".#.", ".#."],
        'U' => ["#.#", "#.#", "#.#", "#.#", "###"],
        'V' => ["#.#", "#.#", "#.#", "#.#", ".#."],
        'W' => ["#.#", "#.#", "###", "###", "#.#"],
        'X' => ["#.#", "#.#", ".#.", "#.#", "#.#"],
        'Y' => ["#.#", "#.#", ".#.", ".#.", ".#."],
        'Z' => ["###", "..#", ".#.", "#..", "###"],
        '=' => ["...", "###", "...", "###", "..."],
        '-' => ["...", "...", "###", "...", "..."],
        '.' => ["...", "...", "...", "...", ".#."],
        '~' => ["...", ".#.", "#.#", "...", "..."],
        '_' => ["...", "...", "...", "...", "###"],
        '^' => [".#.", "#.#", "...", "...", "..."],
        '(' => [".#.", "#..", "#..", "#..", ".#."],
        ')' => [".#.", "..#", "..#", "..#", ".#."],
        ' ' => ["...", "...", "...", "...", "..."],
        _ => return None,
    })
}

/// Width in pixels of `text` at `scale` (glyphs 3 wide, 1 column of spacing).
pub fn text_width(text: &str, scale: u32) -> u32 {
    let n = text.chars().count() as u32;
    if n == 0 {
        0
    } else {
        (n * 4 - 1) * scale
    }
}

/// Height in pixels of a line at `scale`.
pub fn text_height(scale: u32) -> u32 {
    5 * scale
}

/// Draws `text` with its top-left corner at (x, y); unknown characters draw as blanks and
/// pixels outside the image are skipped.
pub fn draw_text(img: &mut RgbImage, text: &str, x: i64, y: i64, scale: u32, color: Rgb<u8>) {
    let s = scale as i64;
    for (i, c) in text.chars().enumerate() {
        let Some(rows) = glyph(c) else { continue };
        let gx = x + i as i64 * 4 * s;
        for (r, row) in rows.iter().enumerate() {
            for (col, b) in row.bytes().enumerate() {
                if b != b'#' {
                    continue;
                }
                for dy in 0..s {
                    for dx in 0..s {
                        let (px, py) = (gx + col as i64 * s + dx, y + r as i64 * s + dy);
                        if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                            img.put_pixel(px as u32, py as u32, color);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_glyph_is_3x5() {
        for c in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ=-.~_^() ".chars() {
            let g = glyph(c).unwrap();
            assert!(g.iter().all(|r| r.len() == 3), "{c}");
        }
        assert_eq!(text_width("t=1000", 2), 46);
    }

    #[test]
    fn draws_inside_and_clips_outside() {
        let mut img = RgbImage::new(10, 10);
        draw_text(&mut img, "1", 0, 0, 1, Rgb([255, 255, 255]));
        assert_eq!(img.get_pixel(1, 0).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 0]);
        draw_text(&mut img, "888", 8, 8, 2, Rgb([255, 255, 255])); // clipped, no panic
    }
}
