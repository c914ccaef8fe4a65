//! Wire types of the temp-file API and the table of accepted formats.
//!
//! Accepted extensions (case-insensitive) and the content each must have (checked on the first
//! bytes of the upload, so a renamed file is refused):
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
//! | video | mp4, mov, m4v | video/mp4, video/quicktime, video/x-m4v | ISO base media |
//! | video | avi | video/x-msvideo | RIFF….AVI |
//! | video | wmv | video/x-ms-wmv | ASF header GUID |
//! | video | flv | video/x-flv | `FLV` |
//! | video | mpeg, mpg | video/mpeg | MPEG-PS/ES start code or MPEG-TS sync bytes |
//! | video | webm, mkv | video/webm, video/x-matroska | EBML header |

use serde::{Deserialize, Serialize};

/// The kind of a stored file, as reported in `file_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum FileType {
    /// png, jpg, jpeg, gif, webp
    Image,
    /// mp3, wav, ogg, aac, m4a, flac
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
/// extension `ext`. False for extensions that are not accepted.
pub fn content_matches_extension(ext: &str, head: &[u8]) -> bool {
    let Some(format) = format(ext) else {
        return false;
    };
    format
        .signatures
        .iter()
        .any(|s| signature_matches(*s, head))
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
        assert_eq!(allowed_extensions().count(), 21);
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
    }
}
