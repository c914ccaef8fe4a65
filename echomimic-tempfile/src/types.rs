//! Wire types of the temp-file API and the table of accepted formats.
//!
//! Accepted extensions (case-insensitive) and the content each must have (checked on the first
//! bytes of the upload):
//!
//! | type | extension | Content-Type | content |
//! |---|---|---|---|
//! | image | png | image/png | PNG signature |
//! | image | jpg, jpeg | image/jpeg | JPEG SOI marker |
//! | image | gif | image/gif | `GIF87a`/`GIF89a` |
//! | image | webp | image/webp | RIFF….WEBP |
//! | audio | mp3 | audio/mpeg | ID3 tag or an MPEG audio frame header |
//! | audio | wav | audio/wav | RIFF/RF64/BW64….WAVE |
//! | audio | ogg | audio/ogg | `OggS` |
//! | audio | aac | audio/aac | ADTS frame header, `ADIF`, or ID3 tag |
//! | audio | m4a | audio/mp4 | ISO base media (ftyp/moov/mdat… box) |
//! | audio | flac | audio/flac | `fLaC` or ID3 tag |
//! | audio | opus | audio/ogg | `OggS` (voice notes) |
//! | audio | weba | audio/webm | EBML header (browser recordings) |
//! | audio | amr | audio/amr | `#!AMR` |
//! | audio | wma | audio/x-ms-wma | ASF header GUID |
//! | video | mp4, mov, m4v | video/mp4, video/quicktime, video/x-m4v | ISO base media |
//! | video | avi | video/x-msvideo | RIFF….AVI |
//! | video | wmv | video/x-ms-wmv | ASF header GUID |
//! | video | flv | video/x-flv | `FLV` |
//! | video | mpeg, mpg | video/mpeg | MPEG-PS/ES start code or MPEG-TS sync bytes |
//! | video | webm, mkv | video/webm, video/x-matroska | EBML header |
//!
//! Misnamed files (what [`recognise_content`] decides): people rename files and apps save them
//! under the wrong extension (a JPEG named `.png`, a WAV named `.mp3`). An upload is accepted when
//! its content is the format its extension names, or else any accepted format **of the same
//! kind** (image content under an image name, audio under an audio name, video under a video
//! name); it is then stored and served under its true type: the true `Content-Type` on download,
//! `file_type` of that kind, while `original_name` (and the download's `Content-Disposition`)
//! keep the name as sent, extension included. Content that is no accepted format of the name's
//! kind (text named `.png`, an executable named `.wav`, a video named `.png`) is refused, and so
//! are HEIC/HEIF and AVIF photos, with a message naming the format and asking for a JPEG or PNG.

use serde::{Deserialize, Serialize};

/// The kind of a stored file, as reported in `file_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum FileType {
    /// png, jpg, jpeg, gif, webp
    Image,
    /// mp3, wav, ogg, aac, m4a, flac, opus, weba, amr, wma
    Audio,
    /// mp4, avi, mov, wmv, flv, mpeg, mpg, m4v, webm, mkv
    Video,
    /// A type this version does not know (decoding only).
    #[serde(other)]
    Other,
}

/// The success body of `POST /api/tempfile/upload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadedFile {
    /// The new file's id (a UUID v4 on our server).
    pub file_id: String,
    /// The kind of file, from its extension.
    pub file_type: FileType,
    /// The file name as stored (sanitised: no directories, no control characters).
    pub original_name: String,
    /// Size in bytes (our server only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// When the file expires, Unix time in seconds (our server only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// A detected container/codec signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signature {
    Png,
    Jpeg,
    Gif,
    Webp,
    Wav,
    Avi,
    Id3,
    MpegAudio,
    Adts,
    Adif,
    Ogg,
    Flac,
    IsoBmff,
    Asf,
    Flv,
    MpegPs,
    MpegTs,
    Ebml,
    Amr,
}

struct Format {
    ext: &'static str,
    file_type: FileType,
    content_type: &'static str,
    signatures: &'static [Signature],
}

use Signature as S;

const FORMATS: &[Format] = &[
    Format {
        ext: "png",
        file_type: FileType::Image,
        content_type: "image/png",
        signatures: &[S::Png],
    },
    Format {
        ext: "jpg",
        file_type: FileType::Image,
        content_type: "image/jpeg",
        signatures: &[S::Jpeg],
    },
    Format {
        ext: "jpeg",
        file_type: FileType::Image,
        content_type: "image/jpeg",
        signatures: &[S::Jpeg],
    },
    Format {
        ext: "gif",
        file_type: FileType::Image,
        content_type: "image/gif",
        signatures: &[S::Gif],
    },
    Format {
        ext: "webp",
        file_type: FileType::Image,
        content_type: "image/webp",
        signatures: &[S::Webp],
    },
    Format {
        ext: "mp3",
        file_type: FileType::Audio,
        content_type: "audio/mpeg",
        signatures: &[S::Id3, S::MpegAudio],
    },
    Format {
        ext: "wav",
        file_type: FileType::Audio,
        content_type: "audio/wav",
        signatures: &[S::Wav],
    },
    Format {
        ext: "ogg",
        file_type: FileType::Audio,
        content_type: "audio/ogg",
        signatures: &[S::Ogg],
    },
    Format {
        ext: "aac",
        file_type: FileType::Audio,
        content_type: "audio/aac",
        signatures: &[S::Adts, S::Adif, S::Id3],
    },
    Format {
        ext: "m4a",
        file_type: FileType::Audio,
        content_type: "audio/mp4",
        signatures: &[S::IsoBmff],
    },
    Format {
        ext: "flac",
        file_type: FileType::Audio,
        content_type: "audio/flac",
        signatures: &[S::Flac, S::Id3],
    },
    Format {
        ext: "opus",
        file_type: FileType::Audio,
        content_type: "audio/ogg",
        signatures: &[S::Ogg],
    },
    Format {
        ext: "weba",
        file_type: FileType::Audio,
        content_type: "audio/webm",
        signatures: &[S::Ebml],
    },
    Format {
        ext: "amr",
        file_type: FileType::Audio,
        content_type: "audio/amr",
        signatures: &[S::Amr],
    },
    Format {
        ext: "wma",
        file_type: FileType::Audio,
        content_type: "audio/x-ms-wma",
        signatures: &[S::Asf],
    },
    Format {
        ext: "mp4",
        file_type: FileType::Video,
        content_type: "video/mp4",
        signatures: &[S::IsoBmff],
    },
    Format {
        ext: "avi",
        file_type: FileType::Video,
        content_type: "video/x-msvideo",
        signatures: &[S::Avi],
    },
    Format {
        ext: "mov",
        file_type: FileType::Video,
        content_type: "video/quicktime",
        signatures: &[S::IsoBmff],
    },
    Format {
        ext: "wmv",
        file_type: FileType::Video,
        content_type: "video/x-ms-wmv",
        signatures: &[S::Asf],
    },
    Format {
        ext: "flv",
        file_type: FileType::Video,
        content_type: "video/x-flv",
        signatures: &[S::Flv],
    },
    Format {
        ext: "mpeg",
        file_type: FileType::Video,
        content_type: "video/mpeg",
        signatures: &[S::MpegPs, S::MpegTs],
    },
    Format {
        ext: "mpg",
        file_type: FileType::Video,
        content_type: "video/mpeg",
        signatures: &[S::MpegPs, S::MpegTs],
    },
    Format {
        ext: "m4v",
        file_type: FileType::Video,
        content_type: "video/x-m4v",
        signatures: &[S::IsoBmff],
    },
    Format {
        ext: "webm",
        file_type: FileType::Video,
        content_type: "video/webm",
        signatures: &[S::Ebml],
    },
    Format {
        ext: "mkv",
        file_type: FileType::Video,
        content_type: "video/x-matroska",
        signatures: &[S::Ebml],
    },
];

/// How many leading bytes [`content_matches_extension`] looks at (at most).
pub const SNIFF_BYTES: usize = 512;

fn format(ext: &str) -> Option<&'static Format> {
    FORMATS.iter().find(|f| f.ext.eq_ignore_ascii_case(ext))
}

/// The file type of an accepted extension (without the dot, any case); `None` if not accepted.
pub fn file_type_for_extension(ext: &str) -> Option<FileType> {
    format(ext).map(|f| f.file_type)
}

/// The Content-Type served for an extension; `application/octet-stream` when unknown.
pub fn content_type_for_extension(ext: &str) -> &'static str {
    format(ext).map_or("application/octet-stream", |f| f.content_type)
}

/// The accepted extensions, lowercase.
pub fn allowed_extensions() -> impl Iterator<Item = &'static str> {
    FORMATS.iter().map(|f| f.ext)
}

/// The lowercase extension of a file name (after the last `.`), if any.
pub fn extension_of(name: &str) -> Option<String> {
    let (stem, ext) = name.rsplit_once('.')?;
    (!stem.is_empty() && !ext.is_empty()).then(|| ext.to_ascii_lowercase())
}

/// True when `head` (the first bytes of a file, up to [`SNIFF_BYTES`]) looks like a file of
/// extension `ext` itself. False for extensions that are not accepted.
pub fn content_matches_extension(ext: &str, head: &[u8]) -> bool {
    format(ext).is_some_and(|f| format_matches(f, head))
}

fn format_matches(format: &Format, head: &[u8]) -> bool {
    format
        .signatures
        .iter()
        .any(|s| signature_matches(*s, head))
}

/// The format an upload was recognised as (see the module docs on misnamed files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recognised {
    /// The canonical extension of the true format, e.g. `jpg` for a JPEG named `.png`.
    pub ext: &'static str,
    /// Its kind (always the kind the name says).
    pub file_type: FileType,
    /// The `Content-Type` it is served with.
    pub content_type: &'static str,
    /// True when the content is not the format the name's extension says.
    pub renamed: bool,
}

/// Why [`recognise_content`] refused an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentRefusal {
    /// The extension is not an accepted one.
    ExtensionNotAllowed,
    /// A photo format we do not decode: `"HEIC/HEIF"` or `"AVIF"`.
    UnsupportedPhoto(&'static str),
    /// The content is no accepted format of the kind the name says.
    NotOfItsKind(FileType),
}

impl std::fmt::Display for ContentRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ContentRefusal::ExtensionNotAllowed => f.write_str("the file type is not allowed"),
            ContentRefusal::UnsupportedPhoto(format) => write!(
                f,
                "the content is a {format} photo, which is not accepted: convert it to JPEG or PNG \
                 first (on an iPhone, Settings > Camera > Formats > Most Compatible saves JPEG)"
            ),
            ContentRefusal::NotOfItsKind(kind) => {
                let (kind, list) = match kind {
                    FileType::Image => ("image", kinds_list(FileType::Image)),
                    FileType::Audio => ("audio", kinds_list(FileType::Audio)),
                    FileType::Video => ("video", kinds_list(FileType::Video)),
                    FileType::Other => ("other", String::new()),
                };
                write!(
                    f,
                    "the content is not an accepted {kind} format ({list}); the file type is \
                     checked by content, not only by name"
                )
            }
        }
    }
}

fn kinds_list(kind: FileType) -> String {
    let mut v: Vec<&str> = Vec::new();
    for f in FORMATS.iter().filter(|f| f.file_type == kind) {
        if !v.contains(&f.content_type) {
            v.push(f.content_type);
        }
    }
    v.join(", ")
}

/// Decides what an upload named with extension `ext` whose content starts with `head` (up to
/// [`SNIFF_BYTES`]) is: the named format when the content is that, else the first accepted format
/// of the same kind the content is (in the table's order), else a refusal. HEIC/HEIF and AVIF
/// photos are refused whatever the name.
pub fn recognise_content(ext: &str, head: &[u8]) -> Result<Recognised, ContentRefusal> {
    let named = format(ext).ok_or(ContentRefusal::ExtensionNotAllowed)?;
    if let Some(photo) = heif_family(head) {
        return Err(ContentRefusal::UnsupportedPhoto(photo));
    }
    let recognised = |f: &'static Format, renamed| Recognised {
        ext: f.ext,
        file_type: f.file_type,
        content_type: f.content_type,
        renamed,
    };
    if format_matches(named, head) {
        return Ok(recognised(named, false));
    }
    FORMATS
        .iter()
        .find(|f| f.file_type == named.file_type && format_matches(f, head))
        .map(|f| recognised(f, true))
        .ok_or(ContentRefusal::NotOfItsKind(named.file_type))
}

/// `Some("HEIC/HEIF")` or `Some("AVIF")` when `h` is an ISO base media file whose major or
/// compatible brands say it is a HEIF still image or an AVIF one.
fn heif_family(h: &[u8]) -> Option<&'static str> {
    if h.get(4..8) != Some(b"ftyp") {
        return None;
    }
    let size = u32::from_be_bytes(h.get(0..4)?.try_into().ok()?) as usize;
    let end = size.clamp(16, h.len().max(16)).min(h.len());
    let mut brands = vec![h.get(8..12)?];
    brands.extend(h.get(16..end).unwrap_or(&[]).chunks_exact(4));
    let is = |list: &[&[u8]]| brands.iter().any(|b| list.contains(b));
    if is(&[b"avif", b"avis"]) {
        Some("AVIF")
    } else if is(&[
        b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1",
    ]) {
        Some("HEIC/HEIF")
    } else {
        None
    }
}

fn signature_matches(sig: Signature, h: &[u8]) -> bool {
    let at = |off: usize, magic: &[u8]| h.get(off..off + magic.len()) == Some(magic);
    match sig {
        S::Png => at(0, b"\x89PNG\r\n\x1a\n"),
        S::Jpeg => at(0, b"\xff\xd8\xff"),
        S::Gif => at(0, b"GIF87a") || at(0, b"GIF89a"),
        S::Webp => at(0, b"RIFF") && at(8, b"WEBP"),
        S::Wav => (at(0, b"RIFF") || at(0, b"RF64") || at(0, b"BW64")) && at(8, b"WAVE"),
        S::Avi => at(0, b"RIFF") && at(8, b"AVI "),
        S::Id3 => at(0, b"ID3"),
        // 11 sync bits, MPEG version not "reserved" (01), layer not "reserved" (00).
        S::MpegAudio => {
            h.len() >= 2
                && h[0] == 0xff
                && h[1] & 0xe0 == 0xe0
                && (h[1] >> 3) & 0b11 != 0b01
                && (h[1] >> 1) & 0b11 != 0
        }
        // 12 sync bits, layer 00.
        S::Adts => h.len() >= 2 && h[0] == 0xff && h[1] & 0xf6 == 0xf0,
        S::Adif => at(0, b"ADIF"),
        S::Ogg => at(0, b"OggS"),
        S::Flac => at(0, b"fLaC"),
        S::IsoBmff => [
            &b"ftyp"[..],
            b"moov",
            b"mdat",
            b"wide",
            b"free",
            b"skip",
            b"pnot",
        ]
        .iter()
        .any(|t| at(4, t)),
        S::Asf => at(
            0,
            b"\x30\x26\xb2\x75\x8e\x66\xcf\x11\xa6\xd9\x00\xaa\x00\x62\xce\x6c",
        ),
        S::Flv => at(0, b"FLV\x01"),
        S::MpegPs => at(0, b"\x00\x00\x01\xba") || at(0, b"\x00\x00\x01\xb3"),
        S::MpegTs => h.len() > 188 && h[0] == 0x47 && h[188] == 0x47,
        S::Ebml => at(0, b"\x1a\x45\xdf\xa3"),
        S::Amr => at(0, b"#!AMR"),
    }
}

/// `filename="<ascii>"` plus `filename*=UTF-8''<percent-encoded>` for names that are
/// not plain ASCII (RFC 6266 / RFC 8187): the multipart header of an upload and the
/// server's `Content-Disposition` share it.
pub(crate) fn filename_params(name: &str) -> String {
    let ascii: String = name
        .chars()
        .map(|c| {
            if (c.is_ascii_graphic() && c != '"' && c != '\\') || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if ascii == name {
        return format!("filename=\"{ascii}\"");
    }
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_extension_has_a_type_and_content_type() {
        for ext in allowed_extensions() {
            assert!(file_type_for_extension(ext).is_some());
            assert_ne!(content_type_for_extension(ext), "application/octet-stream");
            assert!(file_type_for_extension(&ext.to_uppercase()).is_some());
        }
        assert_eq!(allowed_extensions().count(), 25);
        assert_eq!(file_type_for_extension("exe"), None);
        assert_eq!(file_type_for_extension("svg"), None);
    }

    #[test]
    fn extension_parsing() {
        assert_eq!(extension_of("a.PNG").as_deref(), Some("png"));
        assert_eq!(extension_of("a.tar.gz").as_deref(), Some("gz"));
        assert_eq!(extension_of(".png"), None);
        assert_eq!(extension_of("png"), None);
        assert_eq!(extension_of("a."), None);
    }

    #[test]
    fn sniffing() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        assert!(content_matches_extension("png", png));
        assert!(!content_matches_extension("jpg", png));
        assert!(content_matches_extension(
            "jpeg",
            b"\xff\xd8\xff\xe0\0\x10JFIF"
        ));
        assert!(content_matches_extension("wav", b"RIFF\x24\0\0\0WAVEfmt "));
        assert!(!content_matches_extension(
            "webp",
            b"RIFF\x24\0\0\0WAVEfmt "
        ));
        assert!(content_matches_extension("webp", b"RIFF\x24\0\0\0WEBPVP8 "));
        assert!(content_matches_extension("mp3", b"ID3\x04\0\0"));
        assert!(content_matches_extension("mp3", b"\xff\xfb\x90\x64"));
        assert!(!content_matches_extension("mp3", b"\xff\xf1\x50\x80")); // ADTS, layer 00
        assert!(content_matches_extension("aac", b"\xff\xf1\x50\x80"));
        assert!(content_matches_extension("mp4", b"\0\0\0\x20ftypisom"));
        assert!(content_matches_extension("m4a", b"\0\0\0\x20ftypM4A "));
        assert!(content_matches_extension("mkv", b"\x1a\x45\xdf\xa3\x9f"));
        assert!(content_matches_extension("flac", b"fLaC\0\0\0\x22"));
        assert!(content_matches_extension("ogg", b"OggS\0\x02"));
        assert!(!content_matches_extension("png", b""));
        assert!(!content_matches_extension("exe", b"MZ"));
        let mut ts = vec![0u8; 189];
        ts[0] = 0x47;
        ts[188] = 0x47;
        assert!(content_matches_extension("mpg", &ts));
        assert!(content_matches_extension("amr", b"#!AMR\n"));
        assert!(content_matches_extension("opus", b"OggS\0\x02"));
    }

    #[test]
    fn misnamed_files_are_recognised_within_their_kind() {
        let jpeg = b"\xff\xd8\xff\xe0\0\x10JFIF";
        let r = recognise_content("png", jpeg).unwrap();
        assert_eq!(
            (r.ext, r.content_type, r.renamed),
            ("jpg", "image/jpeg", true)
        );
        assert_eq!(r.file_type, FileType::Image);
        let r = recognise_content("jpeg", jpeg).unwrap();
        assert_eq!((r.ext, r.renamed), ("jpeg", false));
        let wav = b"RIFF\x24\0\0\0WAVEfmt ";
        let r = recognise_content("mp3", wav).unwrap();
        assert_eq!(
            (r.ext, r.content_type, r.renamed),
            ("wav", "audio/wav", true)
        );
        // An MP4 under an audio name is audio (m4a), under a video name video.
        let mp4 = b"\0\0\0\x20ftypisom\0\0\x02\0isomiso2";
        assert_eq!(
            recognise_content("wav", mp4).unwrap().content_type,
            "audio/mp4"
        );
        assert_eq!(
            recognise_content("mov", mp4).unwrap().content_type,
            "video/quicktime"
        );
        // Other kinds and unknown content stay refused.
        assert_eq!(
            recognise_content("png", wav),
            Err(ContentRefusal::NotOfItsKind(FileType::Image))
        );
        assert_eq!(
            recognise_content("wav", b"MZ\x90\0"),
            Err(ContentRefusal::NotOfItsKind(FileType::Audio))
        );
        assert_eq!(
            recognise_content("exe", jpeg),
            Err(ContentRefusal::ExtensionNotAllowed)
        );
        let heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic";
        assert_eq!(
            recognise_content("jpg", heic),
            Err(ContentRefusal::UnsupportedPhoto("HEIC/HEIF"))
        );
        let avif = b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf";
        assert_eq!(
            recognise_content("png", avif),
            Err(ContentRefusal::UnsupportedPhoto("AVIF"))
        );
        assert!(ContentRefusal::UnsupportedPhoto("AVIF")
            .to_string()
            .contains("JPEG or PNG"));
    }
}
