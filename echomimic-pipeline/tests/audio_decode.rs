//! Decoding and resampling against the `ffmpeg` CLI, the reference's loader.
//!
//! Fixtures are generated at test time with ffmpeg into a temporary folder
//! (from the golden speech and from ffmpeg's own noise sources), so the
//! tests need `ffmpeg` on `PATH`; CI installs it. Each comparison uses the
//! reference's exact loader command,
//! `ffmpeg -nostdin -threads 0 -i FILE -f s16le -ac 1 -acodec pcm_s16le -ar 16000 -`,
//! and prints its figures (`cargo test -p echomimic-pipeline --test
//! audio_decode -- --nocapture` shows them).

// tests/common/mod.rs (shared, not ours) trips this lint on main.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use common::golden_dir;
use echomimic_pipeline::audio::{self, AudioLimits, DecodedAudio};
use echomimic_pipeline::{AudioError, PipelineError};

/// Runs ffmpeg with `args`, failing loudly when it is not installed.
fn ffmpeg(args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
        .args(args)
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "these tests need the `ffmpeg` CLI on PATH to generate fixtures and reference \
                 decodes (CI installs it; e.g. `apt-get install ffmpeg`): {e}"
            )
        })?;
    anyhow::ensure!(
        out.status.success(),
        "ffmpeg {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// The reference's `whisper.audio.load_audio`, as int16 samples.
fn ffmpeg_load_audio(path: &Path) -> anyhow::Result<Vec<i32>> {
    let path = path.to_str().context("non-UTF-8 path")?;
    let raw = ffmpeg(&[
        "-threads",
        "0",
        "-i",
        path,
        "-f",
        "s16le",
        "-ac",
        "1",
        "-acodec",
        "pcm_s16le",
        "-ar",
        "16000",
        "-",
    ])?;
    Ok(raw
        .chunks_exact(2)
        .map(|c| i32::from(i16::from_le_bytes([c[0], c[1]])))
        .collect())
}

/// ffmpeg's own decode at the native rate and channel count, as f32.
fn ffmpeg_native_f32(path: &Path) -> anyhow::Result<Vec<f32>> {
    let path = path.to_str().context("non-UTF-8 path")?;
    let raw = ffmpeg(&["-i", path, "-f", "f32le", "-acodec", "pcm_f32le", "-"])?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn to_i32(wave: &[f32]) -> Vec<i32> {
    wave.iter().map(|&s| (s * 32768.0).round() as i32).collect()
}

/// Difference between two int16 signals over their common length.
#[derive(Debug)]
struct Diff {
    rms_lsb: f64,
    max_lsb: i32,
    /// Max over the part at least `EDGE` samples away from both ends.
    max_interior_lsb: i32,
    snr_db: f64,
    len_ours: usize,
    len_ffmpeg: usize,
}

const EDGE: usize = 64;

fn diff(ours: &[i32], reference: &[i32]) -> Diff {
    let n = ours.len().min(reference.len());
    let (mut se, mut sig, mut max, mut max_in) = (0f64, 0f64, 0i32, 0i32);
    for i in 0..n {
        let d = ours[i] - reference[i];
        se += f64::from(d) * f64::from(d);
        sig += f64::from(reference[i]) * f64::from(reference[i]);
        max = max.max(d.abs());
        if i >= EDGE && i + EDGE < n {
            max_in = max_in.max(d.abs());
        }
    }
    let rms = (se / n.max(1) as f64).sqrt();
    Diff {
        rms_lsb: rms,
        max_lsb: max,
        max_interior_lsb: max_in,
        snr_db: 10.0 * (sig / se.max(1e-12)).log10(),
        len_ours: ours.len(),
        len_ffmpeg: reference.len(),
    }
}

struct Fixtures {
    dir: tempfile::TempDir,
}

impl Fixtures {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            dir: tempfile::tempdir()?,
        })
    }

    /// Encodes `input` (plus extra ffmpeg output options) to `name`.
    fn encode(&self, input: &[&str], name: &str, opts: &[&str]) -> anyhow::Result<PathBuf> {
        let out = self.dir.path().join(name);
        let mut args: Vec<&str> = input.to_vec();
        args.extend_from_slice(opts);
        let out_str = out.to_str().context("non-UTF-8 temp path")?;
        args.push(out_str);
        ffmpeg(&args)?;
        Ok(out)
    }
}

fn golden_speech() -> PathBuf {
    golden_dir().join("inputs/speech.wav")
}

/// Speech in every container/codec the worker accepts decodes to the same
/// rate and channels as ffmpeg reports, and the 16 kHz waveform tracks
/// ffmpeg's within the codec's decoder differences.
#[test]
fn common_formats_decode_like_ffmpeg() -> anyhow::Result<()> {
    let fx = Fixtures::new()?;
    let speech = golden_speech();
    let speech = speech.to_str().context("path")?;
    // (file, ffmpeg options, rate, channels)
    let cases: &[(&str, &[&str], u32, usize)] = &[
        (
            "s44.wav",
            &["-ar", "44100", "-ac", "2", "-c:a", "pcm_s16le"],
            44_100,
            2,
        ),
        (
            "s48_f32.wav",
            &["-ar", "48000", "-c:a", "pcm_f32le"],
            48_000,
            1,
        ),
        ("s22.flac", &["-ar", "22050", "-c:a", "flac"], 22_050, 1),
        (
            "s44.mp3",
            &["-ar", "44100", "-c:a", "libmp3lame", "-b:a", "64k"],
            44_100,
            1,
        ),
        (
            "s48.ogg",
            &["-ar", "48000", "-ac", "2", "-c:a", "libvorbis", "-q:a", "3"],
            48_000,
            2,
        ),
        // AAC in MP4: the 1024 priming samples must be skipped (edit list).
        (
            "s44.m4a",
            &["-ar", "44100", "-ac", "2", "-c:a", "aac", "-b:a", "96k"],
            44_100,
            2,
        ),
        (
            "s16.aac",
            &["-ar", "16000", "-c:a", "aac", "-b:a", "48k", "-f", "adts"],
            16_000,
            1,
        ),
        // Apple Lossless in MP4 (lossless: the PCM must match ffmpeg's exactly).
        (
            "s44_alac.m4a",
            &["-ar", "44100", "-ac", "2", "-c:a", "alac"],
            44_100,
            2,
        ),
        // H.264 video first, AAC audio second (a phone recording).
        (
            "v44.mp4",
            &[
                "-c:v",
                "libx264",
                "-c:a",
                "aac",
                "-ar",
                "44100",
                "-shortest",
            ],
            44_100,
            1,
        ),
    ];
    // Decoders differ from ffmpeg's by float rounding only (measured ≤ 1.1e-6).
    const NATIVE_ATOL: f32 = 1e-5;
    // Measured ≥ 76 dB (s16 sources) and ≥ 97 dB (float sources).
    const MIN_SNR_DB: f64 = 70.0;
    const MAX_LSB: i32 = 3;
    let limits = AudioLimits::default();
    for &(name, opts, rate, channels) in cases {
        let path = fx.encode(&["-i", speech], name, opts)?;
        let decoded: DecodedAudio =
            audio::decode_file(&path, &limits).with_context(|| format!("decoding {name}"))?;
        anyhow::ensure!(
            (decoded.sample_rate, decoded.channels) == (rate, channels),
            "{name}: {} Hz / {} ch, expected {rate} Hz / {channels} ch",
            decoded.sample_rate,
            decoded.channels
        );
        // Native-rate PCM against ffmpeg's decoder (same trimming of encoder
        // delay and padding).
        let native = ffmpeg_native_f32(&path)?;
        anyhow::ensure!(
            native.len() == decoded.samples.len(),
            "{name}: {} samples decoded, ffmpeg decodes {}",
            decoded.samples.len(),
            native.len()
        );
        let native_max = native
            .iter()
            .zip(&decoded.samples)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let wave = audio::to_whisper_waveform(&decoded, &limits)?;
        let d = diff(&to_i32(&wave), &ffmpeg_load_audio(&path)?);
        eprintln!(
            "{name:12} native: {} vs ffmpeg {} samples, max |diff| {native_max:.2e} | 16 kHz: {d:?}",
            decoded.samples.len(),
            native.len()
        );
        anyhow::ensure!(
            d.len_ours.abs_diff(d.len_ffmpeg) <= 1,
            "{name}: 16 kHz length {} vs ffmpeg {}",
            d.len_ours,
            d.len_ffmpeg
        );
        anyhow::ensure!(
            native_max <= NATIVE_ATOL,
            "{name}: native max diff {native_max}"
        );
        anyhow::ensure!(d.max_lsb <= MAX_LSB, "{name}: {d:?}");
        anyhow::ensure!(
            d.snr_db >= MIN_SNR_DB,
            "{name}: SNR against ffmpeg {:.1} dB < {MIN_SNR_DB} dB",
            d.snr_db
        );
    }
    Ok(())
}

/// How close the resampler comes to ffmpeg's (`-ar 16000`, swr defaults) on
/// speech and on the harder broadband noise, for common rates. These are the
/// figures quoted in `audio::resample_to_16k`'s docs.
#[test]
fn resampler_tracks_ffmpeg() -> anyhow::Result<()> {
    let fx = Fixtures::new()?;
    let speech = golden_speech();
    let speech = speech.to_str().context("path")?;
    let limits = AudioLimits::default();
    for rate in [8_000u32, 22_050, 32_000, 44_100, 48_000] {
        let r = rate.to_string();
        let noise = |color: &str| format!("anoisesrc=d=4:c={color}:r={rate}:a=0.3:seed=7");
        // Speech is upsampled with a long, near-transparent filter and given a
        // faint pink-noise floor so it has content up to the new Nyquist.
        let speech_graph = format!(
            "[0:a]aresample={rate}:filter_size=256:cutoff=0.99[s];\
             anoisesrc=d=1.5:c=pink:r={rate}:a=0.02:seed=3[n];[s][n]amix=inputs=2:normalize=0[o]"
        );
        let signals: Vec<(&str, PathBuf, f64, i32)> = vec![
            (
                "speech",
                fx.encode(
                    &[
                        "-i",
                        speech,
                        "-filter_complex",
                        &speech_graph,
                        "-map",
                        "[o]",
                    ],
                    &format!("speech_{rate}.wav"),
                    &["-c:a", "pcm_s16le"],
                )?,
                72.0,
                4,
            ),
            (
                "pink",
                fx.encode(
                    &["-f", "lavfi", "-i", &noise("pink")],
                    &format!("pink_{rate}.wav"),
                    &["-c:a", "pcm_s16le", "-ar", &r],
                )?,
                67.0,
                4,
            ),
            (
                "white",
                fx.encode(
                    &["-f", "lavfi", "-i", &noise("white")],
                    &format!("white_{rate}.wav"),
                    &["-c:a", "pcm_s16le", "-ar", &r],
                )?,
                70.0,
                4,
            ),
        ];
        for (what, path, min_snr, max_lsb) in signals {
            let wave = audio::to_whisper_waveform(&audio::decode_file(&path, &limits)?, &limits)?;
            let d = diff(&to_i32(&wave), &ffmpeg_load_audio(&path)?);
            eprintln!(
                "{rate:6} Hz {what:6}: rms {:.2} LSB, max {} LSB (interior {}), SNR {:.1} dB, len {} vs ffmpeg {}",
                d.rms_lsb, d.max_lsb, d.max_interior_lsb, d.snr_db, d.len_ours, d.len_ffmpeg
            );
            anyhow::ensure!(
                d.len_ours.abs_diff(d.len_ffmpeg) <= 1,
                "{rate} {what}: {d:?}"
            );
            anyhow::ensure!(d.snr_db >= min_snr, "{rate} {what}: {d:?}");
            anyhow::ensure!(d.max_lsb <= max_lsb, "{rate} {what}: {d:?}");
        }
    }
    Ok(())
}

/// A stereo 16 kHz s16 file down-mixes bit-exactly like ffmpeg's `-ac 1`.
#[test]
fn stereo_16k_downmix_is_exact() -> anyhow::Result<()> {
    let fx = Fixtures::new()?;
    let speech = golden_speech();
    let path = fx.encode(
        &[
            "-i",
            speech.to_str().context("path")?,
            "-f",
            "lavfi",
            "-i",
            "anoisesrc=d=1.5:c=white:r=16000:a=0.3:seed=5",
            "-filter_complex",
            "[0:a][1:a]amerge=inputs=2[o]",
            "-map",
            "[o]",
        ],
        "stereo16k.wav",
        &["-c:a", "pcm_s16le"],
    )?;
    let limits = AudioLimits::default();
    let ours = to_i32(&audio::load_waveform_16k(&path, &limits)?);
    let reference = ffmpeg_load_audio(&path)?;
    anyhow::ensure!(ours == reference, "{:?}", diff(&ours, &reference));
    Ok(())
}

fn audio_err(e: PipelineError) -> anyhow::Result<AudioError> {
    match e {
        PipelineError::Audio(a) => Ok(a),
        other => anyhow::bail!("expected an audio error, got {other}"),
    }
}

#[test]
fn silent_short_long_and_unsupported_inputs_are_typed_errors() -> anyhow::Result<()> {
    let fx = Fixtures::new()?;
    let limits = AudioLimits::default();
    let silent = fx.encode(
        &["-f", "lavfi", "-i", "anullsrc=r=44100:cl=mono", "-t", "2"],
        "silent.mp3",
        &["-c:a", "libmp3lame"],
    )?;
    let err = audio_err(audio::load_waveform_16k(&silent, &limits).unwrap_err())?;
    anyhow::ensure!(matches!(err, AudioError::Silent { .. }), "{err:?}");

    let short = fx.encode(
        &["-f", "lavfi", "-i", "sine=f=440:r=16000", "-t", "0.015"],
        "short.wav",
        &["-c:a", "pcm_s16le"],
    )?;
    let err = audio_err(audio::load_waveform_16k(&short, &limits).unwrap_err())?;
    anyhow::ensure!(matches!(err, AudioError::TooShort { .. }), "{err:?}");

    let strict = AudioLimits {
        max_seconds: 2.0,
        ..limits
    };
    for (name, opts) in [
        ("long.wav", &["-c:a", "pcm_s16le"][..]),
        ("long.mp3", &["-c:a", "libmp3lame"][..]),
        ("long.ogg", &["-c:a", "libvorbis"][..]),
    ] {
        let long = fx.encode(
            &["-f", "lavfi", "-i", "sine=f=440:r=22050", "-t", "3"],
            name,
            opts,
        )?;
        let err = audio_err(audio::load_waveform_16k(&long, &strict).unwrap_err())?;
        anyhow::ensure!(matches!(err, AudioError::TooLong { .. }), "{name}: {err:?}");
        // The same file is fine under the default limit.
        audio::load_waveform_16k(&long, &limits)?;
    }

    // The same typed errors on the built-in path (no ffmpeg).
    let builtin = |path: &Path, limits: &AudioLimits| -> anyhow::Result<AudioError> {
        match audio::load_waveform_16k_with(path, limits, None) {
            Ok(_) => anyhow::bail!("{} decoded without error", path.display()),
            Err(e) => audio_err(e),
        }
    };
    let err = builtin(&silent, &limits)?;
    anyhow::ensure!(matches!(err, AudioError::Silent { .. }), "{err:?}");
    let err = builtin(&short, &limits)?;
    anyhow::ensure!(matches!(err, AudioError::TooShort { .. }), "{err:?}");

    // Garbage under an audio name: ffmpeg refuses it, the built-in decoders type the error.
    let garbage = fx.dir.path().join("garbage.mp3");
    std::fs::write(
        &garbage,
        b"this is not audio at all, just some text".repeat(50),
    )?;
    let err = audio_err(audio::load_waveform_16k(&garbage, &limits).unwrap_err())?;
    anyhow::ensure!(
        matches!(err, AudioError::Unsupported(_) | AudioError::Corrupt(_)),
        "{err:?}"
    );

    // A voice note needs ffmpeg: without it the error says so.
    let opus = fx.encode(
        &["-f", "lavfi", "-i", "sine=f=440:r=48000", "-t", "1"],
        "speech.opus",
        &["-c:a", "libopus"],
    )?;
    audio::load_waveform_16k(&opus, &limits)?;
    let err = audio_err(audio::decode_file_with(&opus, &limits, None).unwrap_err())?;
    anyhow::ensure!(
        matches!(&err, AudioError::Unsupported(m) if m.contains("ffmpeg")),
        "{err:?}"
    );
    eprintln!("opus without ffmpeg: {err}");
    let err = audio_err(
        audio::decode_file_with(&opus, &strict_1s(), Some(Path::new("ffmpeg"))).unwrap_err(),
    )?;
    anyhow::ensure!(matches!(err, AudioError::TooLong { .. }), "{err:?}");

    let missing = audio::load_waveform_16k(fx.dir.path().join("absent.mp3"), &limits).unwrap_err();
    anyhow::ensure!(matches!(missing, PipelineError::Io { .. }), "{missing:?}");
    Ok(())
}

fn strict_1s() -> AudioLimits {
    AudioLimits {
        max_seconds: 0.5,
        ..AudioLimits::default()
    }
}

/// With ffmpeg present the 16 kHz waveform is the reference's command's output bit for bit,
/// for every input rate, mono and stereo, lossless and lossy.
#[test]
fn ffmpeg_path_equals_the_reference_command() -> anyhow::Result<()> {
    let fx = Fixtures::new()?;
    let speech = golden_speech();
    let speech = speech.to_str().context("path")?;
    let limits = AudioLimits::default();
    for rate in [8_000u32, 22_050, 24_000, 44_100, 48_000] {
        for channels in [1u32, 2] {
            // Speech at `rate` plus a faint noise floor (content up to the new Nyquist); the
            // second channel, when there is one, is independent noise.
            let graph = format!(
                "[0:a]aresample={rate}[s];anoisesrc=d=1.5:c=pink:r={rate}:a=0.02:seed=3[n];\
                 [s][n]amix=inputs=2:normalize=0[m];\
                 anoisesrc=d=1.5:c=white:r={rate}:a=0.1:seed=9[w];\
                 {}",
                if channels == 2 {
                    "[m][w]amerge=inputs=2[o]"
                } else {
                    "[m][w]amix=inputs=2:normalize=0[o]"
                }
            );
            for (ext, codec) in [("wav", "pcm_s16le"), ("mp3", "libmp3lame")] {
                let path = fx.encode(
                    &["-i", speech, "-filter_complex", &graph, "-map", "[o]"],
                    &format!("s_{rate}_{channels}.{ext}"),
                    &["-c:a", codec],
                )?;
                let ours = to_i32(&audio::load_waveform_16k(&path, &limits)?);
                let reference = ffmpeg_load_audio(&path)?;
                anyhow::ensure!(
                    ours == reference,
                    "{rate} Hz x{channels} {ext}: {:?}",
                    diff(&ours, &reference)
                );
            }
        }
    }
    Ok(())
}

/// Formats only ffmpeg decodes (voice notes and the like) decode at their native rate exactly
/// as ffmpeg does, and their 16 kHz waveform is the reference's.
#[test]
fn voice_notes_and_other_formats_decode_through_ffmpeg() -> anyhow::Result<()> {
    let fx = Fixtures::new()?;
    let speech = golden_speech();
    let speech = speech.to_str().context("path")?;
    let limits = AudioLimits::default();
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            "voice.ogg",
            &["-i", speech],
            &["-c:a", "libopus", "-b:a", "24k"],
        ),
        (
            "voice.opus",
            &["-i", speech],
            &["-c:a", "libopus", "-ac", "2"],
        ),
        ("recording.webm", &["-i", speech], &["-c:a", "libopus"]),
        (
            "speech.wma",
            &["-i", speech],
            &["-c:a", "wmav2", "-ar", "44100"],
        ),
        (
            // The audio track of a phone-style video (Matroska with a video track).
            "clip.mkv",
            &[
                "-i",
                speech,
                "-f",
                "lavfi",
                "-i",
                "testsrc=size=64x64:rate=10",
                "-shortest",
            ],
            &["-c:v", "mpeg4", "-c:a", "libvorbis"],
        ),
    ];
    for (name, input, opts) in cases {
        let path = fx.encode(input, name, opts)?;
        let decoded = audio::decode_file(&path, &limits).with_context(|| name.to_string())?;
        let native = ffmpeg_native_f32(&path)?;
        anyhow::ensure!(decoded.samples == native, "{name}: native samples differ");
        let ours = to_i32(&audio::load_waveform_16k(&path, &limits)?);
        anyhow::ensure!(ours == ffmpeg_load_audio(&path)?, "{name}: 16 kHz differs");
        let err = audio_err(audio::decode_file_with(&path, &limits, None).unwrap_err())?;
        anyhow::ensure!(
            matches!(err, AudioError::Unsupported(_) | AudioError::Corrupt(_)),
            "{name}: {err:?}"
        );
        eprintln!(
            "{name}: {} Hz x{}, {:.2} s",
            decoded.sample_rate,
            decoded.channels,
            decoded.duration_seconds()
        );
    }
    Ok(())
}

/// xorshift64*: a tiny deterministic generator for fuzz-like inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// An AMR-NB voice note (what older phones and some messengers record) decodes through the
/// ffmpeg fallback exactly as ffmpeg decodes it. This ffmpeg has AMR decoders but no encoder,
/// so the file is made here: the `#!AMR` magic and 100 frames of mode 7 (12.2 kbit/s, 31 bytes
/// each) with pseudo-random bits (AMR frames carry no checksum, so any bits decode: to noise,
/// which the audio checks accept as non-silent).
#[test]
fn an_amr_voice_note_decodes_through_ffmpeg() -> anyhow::Result<()> {
    let fx = Fixtures::new()?;
    let mut rng = Rng(0x5eed_a312);
    let mut amr = b"#!AMR\n".to_vec();
    for _ in 0..100 {
        amr.push(0x3c); // frame type 7, quality bit set
        amr.extend((0..31).map(|_| (rng.next() >> 56) as u8));
    }
    let path = fx.dir.path().join("voice.amr");
    std::fs::write(&path, &amr)?;
    let limits = AudioLimits::default();
    let decoded = audio::decode_file(&path, &limits)?;
    anyhow::ensure!(
        (decoded.sample_rate, decoded.channels) == (8000, 1),
        "{} Hz x{}",
        decoded.sample_rate,
        decoded.channels
    );
    anyhow::ensure!(
        (decoded.duration_seconds() - 2.0).abs() < 0.1,
        "{:.3} s for 100 frames of 20 ms",
        decoded.duration_seconds()
    );
    anyhow::ensure!(
        decoded.samples == ffmpeg_native_f32(&path)?,
        "native samples differ"
    );
    let ours = to_i32(&audio::load_waveform_16k(&path, &limits)?);
    anyhow::ensure!(ours == ffmpeg_load_audio(&path)?, "16 kHz waveform differs");
    let err = audio_err(audio::decode_file_with(&path, &limits, None).unwrap_err())?;
    anyhow::ensure!(
        matches!(err, AudioError::Unsupported(_) | AudioError::Corrupt(_)),
        "without ffmpeg: {err:?}"
    );
    Ok(())
}

/// Random bytes, truncated files and byte-flipped files never panic: every
/// call returns, with a waveform or a typed error.
#[test]
fn random_truncated_and_corrupted_bytes_never_panic() -> anyhow::Result<()> {
    let fx = Fixtures::new()?;
    let speech = golden_speech();
    let speech = speech.to_str().context("path")?;
    let mut files: Vec<(&str, Vec<u8>)> = Vec::new();
    for (name, opts) in [
        ("x.wav", &["-c:a", "pcm_s16le"][..]),
        ("x.mp3", &["-c:a", "libmp3lame"][..]),
        ("x.ogg", &["-c:a", "libvorbis"][..]),
        ("x.flac", &["-c:a", "flac"][..]),
        ("x.m4a", &["-c:a", "aac"][..]),
    ] {
        let path = fx.encode(&["-i", speech], name, opts)?;
        files.push((name, std::fs::read(path)?));
    }
    let limits = AudioLimits::default();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut ok, mut errors, mut caught_panics) = (0usize, 0usize, 0usize);
    let mut check =
        |bytes: &[u8], ext: &str| match audio::waveform_16k_from_bytes(bytes, Some(ext), &limits) {
            Ok(wave) => {
                assert!(wave.len() >= audio::MIN_SAMPLES);
                ok += 1;
            }
            Err(e) => {
                if e.to_string().contains("decoder failed") {
                    caught_panics += 1;
                }
                errors += 1;
            }
        };
    for len in [0usize, 1, 3, 11, 12, 44, 100, 1_000, 10_000] {
        for ext in ["wav", "mp3", "ogg", "flac", "m4a", "aac", "bin"] {
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            check(&bytes, ext);
        }
    }
    for (name, bytes) in &files {
        let ext = name.rsplit('.').next().unwrap_or("");
        // Truncations, including inside the headers.
        for cut in [
            1,
            4,
            8,
            12,
            16,
            36,
            44,
            64,
            200,
            1_000,
            bytes.len() / 3,
            bytes.len() / 2,
            bytes.len() - 1,
        ] {
            check(&bytes[..cut.min(bytes.len())], ext);
        }
        // Random byte corruption, at growing density.
        for flips in [1usize, 10, 100, 1_000] {
            let mut damaged = bytes.clone();
            for _ in 0..flips {
                let i = (rng.next() % damaged.len() as u64) as usize;
                damaged[i] = rng.next() as u8;
            }
            check(&damaged, ext);
        }
        // RIFF/WAVE magic in front of garbage.
        let mut fake = b"RIFF\xff\xff\xff\xffWAVEfmt ".to_vec();
        fake.extend_from_slice(&bytes[..bytes.len().min(500)]);
        check(&fake, "wav");
    }
    eprintln!(
        "fuzz-like inputs: {ok} decoded, {errors} typed errors, {caught_panics} decoder panics caught"
    );
    anyhow::ensure!(errors > 0 && ok > 0);
    Ok(())
}
