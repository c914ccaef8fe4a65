//! A small ISO-BMFF (MP4) reader: box order, tracks, codecs, sample counts and
//! durations. The writer checks every file with it before handing it out, and
//! the tests use it alongside ffprobe.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::error::{PipelineError, Result};

/// Largest `moov` box we read into memory (an hour of 60 fps video has a
/// sample table of a few MB).
const MAX_MOOV_BYTES: u64 = 64 << 20;

/// What a track carries (`hdlr` handler type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackKind {
    /// `vide`.
    Video,
    /// `soun`.
    Audio,
    /// Anything else (hint, text, metadata ...).
    Other,
}

/// One `trak`.
#[derive(Clone, Debug, PartialEq)]
pub struct Mp4Track {
    /// Handler kind.
    pub kind: TrackKind,
    /// Sample entry four-cc: `avc1`, `mp4a`, `Opus`, ...
    pub codec: String,
    /// Media timescale (ticks per second, `mdhd`).
    pub timescale: u32,
    /// Media duration in `timescale` ticks (`mdhd`).
    pub media_duration: u64,
    /// Presented duration in seconds from a single-segment edit list, when
    /// one is present (it hides encoder priming and B-frame delay).
    pub edit_duration_s: Option<f64>,
    /// Number of samples (`stsz`): frames for video, packets for audio.
    pub sample_count: u64,
    /// Number of sync samples (`stss`); `None` when every sample is a sync
    /// sample (the box is absent).
    pub sync_samples: Option<u64>,
    /// Video width from the sample entry.
    pub width: u16,
    /// Video height from the sample entry.
    pub height: u16,
    /// H.264 `profile_idc` and `level_idc` from `avcC`.
    pub avc_profile_level: Option<(u8, u8)>,
    /// Audio channel count from the sample entry.
    pub channels: u16,
    /// Audio sample rate from the sample entry.
    pub sample_rate: u32,
}

impl Mp4Track {
    /// Duration in seconds: the edit list's when present, else the media's.
    pub fn duration_s(&self) -> f64 {
        self.edit_duration_s
            .unwrap_or_else(|| self.media_duration_s())
    }

    /// Media duration in seconds (`mdhd`).
    pub fn media_duration_s(&self) -> f64 {
        if self.timescale == 0 {
            0.0
        } else {
            self.media_duration as f64 / f64::from(self.timescale)
        }
    }
}

/// The parts of an MP4 file the writer and its tests check.
#[derive(Clone, Debug, PartialEq)]
pub struct Mp4Info {
    /// Top-level box types in file order.
    pub top_level: Vec<String>,
    /// `moov` comes before `mdat` (fast start: playback can begin before the
    /// whole file has arrived).
    pub moov_before_mdat: bool,
    /// Major brand from `ftyp`.
    pub major_brand: String,
    /// Movie duration in seconds (`mvhd`).
    pub duration_s: f64,
    /// Tracks in file order.
    pub tracks: Vec<Mp4Track>,
}

impl Mp4Info {
    /// The first track of a kind.
    pub fn track(&self, kind: TrackKind) -> Option<&Mp4Track> {
        self.tracks.iter().find(|t| t.kind == kind)
    }
}

/// Reads the box structure of an MP4 file (only `moov` is loaded; media data
/// is skipped).
pub fn probe_mp4(path: &Path) -> Result<Mp4Info> {
    let bad =
        |what: String| PipelineError::Media(format!("{}: not a valid MP4: {what}", path.display()));
    let file = File::open(path).map_err(|e| PipelineError::io(path, e))?;
    let len = file
        .metadata()
        .map_err(|e| PipelineError::io(path, e))?
        .len();
    let mut r = BufReader::new(file);
    let mut top_level = Vec::new();
    let mut moov = None;
    let mut ftyp = None;
    let mut pos = 0u64;
    while pos < len {
        let mut head = [0u8; 8];
        r.read_exact(&mut head)
            .map_err(|e| bad(format!("box header at {pos}: {e}")))?;
        let mut size = u64::from(be_u32(&head[..4]));
        let kind = fourcc(&head[4..8]);
        let mut header = 8u64;
        if size == 1 {
            let mut large = [0u8; 8];
            r.read_exact(&mut large)
                .map_err(|e| bad(format!("box size at {pos}: {e}")))?;
            size = u64::from_be_bytes(large);
            header = 16;
        } else if size == 0 {
            size = len - pos;
        }
        if size < header || pos + size > len {
            return Err(bad(format!(
                "box `{kind}` at {pos} has size {size}, file is {len} bytes"
            )));
        }
        let payload = size - header;
        if kind == "moov" || kind == "ftyp" {
            if payload > MAX_MOOV_BYTES {
                return Err(bad(format!("`{kind}` box is {payload} bytes")));
            }
            let mut buf = vec![0u8; payload as usize];
            r.read_exact(&mut buf)
                .map_err(|e| bad(format!("reading `{kind}`: {e}")))?;
            if kind == "moov" {
                moov = Some(buf);
            } else {
                ftyp = Some(buf);
            }
        } else {
            r.seek(SeekFrom::Current(payload as i64))
                .map_err(|e| bad(format!("skipping `{kind}`: {e}")))?;
        }
        top_level.push(kind);
        pos += size;
    }
    let moov = moov.ok_or_else(|| bad("no moov box".into()))?;
    let moov_at = top_level.iter().position(|k| k == "moov");
    let mdat_at = top_level.iter().position(|k| k == "mdat");
    let moov_before_mdat = matches!((moov_at, mdat_at), (Some(m), Some(d)) if m < d);
    let major_brand = ftyp
        .as_deref()
        .filter(|f| f.len() >= 4)
        .map(|f| fourcc(&f[..4]))
        .unwrap_or_default();
    let (duration_s, tracks) = parse_moov(&moov).map_err(bad)?;
    Ok(Mp4Info {
        top_level,
        moov_before_mdat,
        major_brand,
        duration_s,
        tracks,
    })
}

type Parse<T> = std::result::Result<T, String>;

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

fn fourcc(b: &[u8]) -> String {
    b.iter()
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                c as char
            } else {
                '?'
            }
        })
        .collect()
}

/// Iterates the child boxes of a payload as `(type, payload)`.
fn children(mut data: &[u8]) -> Parse<Vec<(String, &[u8])>> {
    let mut out = Vec::new();
    while data.len() >= 8 {
        let mut size = be_u32(&data[..4]) as usize;
        let kind = fourcc(&data[4..8]);
        let mut header = 8;
        if size == 1 {
            if data.len() < 16 {
                return Err(format!("truncated large box `{kind}`"));
            }
            size = usize::try_from(be_u64(&data[8..16]))
                .map_err(|_| format!("box `{kind}` too large"))?;
            header = 16;
        } else if size == 0 {
            size = data.len();
        }
        if size < header || size > data.len() {
            return Err(format!(
                "box `{kind}` has size {size}, {} bytes left",
                data.len()
            ));
        }
        out.push((kind, &data[header..size]));
        data = &data[size..];
    }
    Ok(out)
}

fn child<'a>(data: &'a [u8], kind: &str) -> Parse<Option<&'a [u8]>> {
    Ok(children(data)?
        .into_iter()
        .find(|(k, _)| k == kind)
        .map(|(_, p)| p))
}

fn need<'a>(data: &'a [u8], path: &[&str]) -> Parse<&'a [u8]> {
    let mut cur = data;
    for kind in path {
        cur = child(cur, kind)?.ok_or_else(|| format!("missing `{}`", path.join("/")))?;
    }
    Ok(cur)
}

fn check_len(b: &[u8], n: usize, what: &str) -> Parse<()> {
    if b.len() < n {
        Err(format!("`{what}` is truncated ({} < {n} bytes)", b.len()))
    } else {
        Ok(())
    }
}

/// `(timescale, duration)` of an `mvhd` or `mdhd` payload.
fn timescale_duration(b: &[u8], what: &str) -> Parse<(u32, u64)> {
    check_len(b, 4, what)?;
    if b[0] == 1 {
        check_len(b, 32, what)?;
        Ok((be_u32(&b[20..24]), be_u64(&b[24..32])))
    } else {
        check_len(b, 20, what)?;
        Ok((be_u32(&b[12..16]), u64::from(be_u32(&b[16..20]))))
    }
}

fn parse_moov(moov: &[u8]) -> Parse<(f64, Vec<Mp4Track>)> {
    let (movie_scale, movie_duration) = timescale_duration(need(moov, &["mvhd"])?, "mvhd")?;
    let duration_s = if movie_scale == 0 {
        0.0
    } else {
        movie_duration as f64 / f64::from(movie_scale)
    };
    let mut tracks = Vec::new();
    for (kind, trak) in children(moov)? {
        if kind == "trak" {
            tracks.push(parse_trak(trak, movie_scale)?);
        }
    }
    Ok((duration_s, tracks))
}

fn parse_trak(trak: &[u8], movie_scale: u32) -> Parse<Mp4Track> {
    let mdia = need(trak, &["mdia"])?;
    let (timescale, media_duration) = timescale_duration(need(mdia, &["mdhd"])?, "mdhd")?;
    let hdlr = need(mdia, &["hdlr"])?;
    check_len(hdlr, 12, "hdlr")?;
    let kind = match &hdlr[8..12] {
        b"vide" => TrackKind::Video,
        b"soun" => TrackKind::Audio,
        _ => TrackKind::Other,
    };
    let stbl = need(mdia, &["minf", "stbl"])?;
    let stsd = need(stbl, &["stsd"])?;
    check_len(stsd, 8, "stsd")?;
    let entries = children(&stsd[8..])?;
    let (codec, entry) = entries.first().ok_or("empty `stsd`")?;
    let mut track = Mp4Track {
        kind,
        codec: codec.clone(),
        timescale,
        media_duration,
        edit_duration_s: None,
        sample_count: 0,
        sync_samples: None,
        width: 0,
        height: 0,
        avc_profile_level: None,
        channels: 0,
        sample_rate: 0,
    };
    match kind {
        TrackKind::Video => {
            // VisualSampleEntry: 8 bytes SampleEntry, 16 reserved, then
            // width and height; child boxes start after 78 bytes.
            check_len(entry, 78, "visual sample entry")?;
            track.width = be_u16(&entry[24..26]);
            track.height = be_u16(&entry[26..28]);
            if let Some(avcc) = child(&entry[78..], "avcC")? {
                check_len(avcc, 4, "avcC")?;
                track.avc_profile_level = Some((avcc[1], avcc[3]));
            }
        }
        TrackKind::Audio => {
            // AudioSampleEntry: 8 bytes SampleEntry, 8 reserved, channel
            // count, sample size, 4 reserved, 16.16 sample rate.
            check_len(entry, 28, "audio sample entry")?;
            track.channels = be_u16(&entry[16..18]);
            track.sample_rate = be_u32(&entry[24..28]) >> 16;
        }
        TrackKind::Other => {}
    }
    let stsz = need(stbl, &["stsz"])?;
    check_len(stsz, 12, "stsz")?;
    track.sample_count = u64::from(be_u32(&stsz[8..12]));
    if let Some(stss) = child(stbl, "stss")? {
        check_len(stss, 8, "stss")?;
        track.sync_samples = Some(u64::from(be_u32(&stss[4..8])));
    }
    if let Some(elst) = child(trak, "edts")?
        .map(|e| child(e, "elst"))
        .transpose()?
        .flatten()
    {
        track.edit_duration_s = edit_duration(elst, movie_scale)?;
    }
    Ok(track)
}

/// Total duration of the non-empty segments of an edit list, in seconds.
fn edit_duration(elst: &[u8], movie_scale: u32) -> Parse<Option<f64>> {
    check_len(elst, 8, "elst")?;
    let version = elst[0];
    let count = be_u32(&elst[4..8]) as usize;
    let entry = if version == 1 { 20 } else { 12 };
    check_len(elst, 8 + count * entry, "elst")?;
    if count == 0 || movie_scale == 0 {
        return Ok(None);
    }
    let mut total = 0u64;
    for i in 0..count {
        let e = &elst[8 + i * entry..8 + (i + 1) * entry];
        let (segment, media_time) = if version == 1 {
            (be_u64(&e[..8]), be_u64(&e[8..16]) as i64)
        } else {
            (
                u64::from(be_u32(&e[..4])),
                i64::from(be_u32(&e[4..8]) as i32),
            )
        };
        if media_time >= 0 {
            total += segment;
        }
    }
    Ok(Some(total as f64 / f64::from(movie_scale)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bx(kind: &[u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut v = ((payload.len() + 8) as u32).to_be_bytes().to_vec();
        v.extend_from_slice(kind);
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn children_reject_overlong_boxes() {
        let mut data = bx(b"free", &[0; 4]);
        data[3] = 200;
        assert!(children(&data).is_err());
        assert_eq!(children(&bx(b"free", &[1, 2])).map(|c| c.len()), Ok(1));
    }

    #[test]
    fn edit_lists_skip_empty_edits_and_use_the_movie_timescale() {
        let mut elst = vec![0, 0, 0, 0, 0, 0, 0, 2];
        // an empty edit (media_time -1) of 100 ticks, then 1500 ticks of media
        elst.extend_from_slice(&100u32.to_be_bytes());
        elst.extend_from_slice(&(-1i32).to_be_bytes());
        elst.extend_from_slice(&[0, 1, 0, 0]);
        elst.extend_from_slice(&1500u32.to_be_bytes());
        elst.extend_from_slice(&1024u32.to_be_bytes());
        elst.extend_from_slice(&[0, 1, 0, 0]);
        assert_eq!(edit_duration(&elst, 1000), Ok(Some(1.5)));
        assert!(edit_duration(&elst[..20], 1000).is_err());
    }
}
