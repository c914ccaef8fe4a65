//! The built-in backend (cargo feature `builtin-encoder`): no external program.
//!
//! * Video: OpenH264 compiled from its bundled C++ source (`openh264` crate,
//!   feature `source`, BSD-2). It emits H.264 **Constrained Baseline** (no
//!   B-frames, CAVLC), which every H.264 decoder plays, at a bit rate sized
//!   from the frame area ([`BuiltinSettings::bits_per_pixel`]). Frames are
//!   converted to yuv420p here (BT.601 limited range, the same conversion the
//!   ffmpeg path uses) and encoded one at a time; only the compressed packets
//!   are kept until the file is written.
//! * Audio: Opus (`opus-rs`, a pure-Rust port of libopus, BSD-3), 48 kHz,
//!   20 ms packets; other rates are resampled with rubato first.
//! * Container: `muxide` (pure Rust) writes a fast-start MP4 (`moov` before
//!   `mdat`) with H.264 + Opus, which Chromium/Chrome/Edge and Firefox play;
//!   Safari plays Opus in MP4 only in recent versions.
//! * Licence note: Cisco's H.264 patent licence covers only the OpenH264
//!   binaries Cisco distributes, not a build from source; deployments that
//!   care should use the ffmpeg backend or obtain their own licence.
//!
//! [`BuiltinSettings::bits_per_pixel`]: super::spec::BuiltinSettings::bits_per_pixel

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use muxide::api::{AudioCodec, Muxer, MuxerBuilder, VideoCodec};
use openh264::encoder::{
    BitRate, ColorPrimaries, Complexity, Encoder, EncoderConfig, FrameRate, FrameType,
    IntraFramePeriod, RateControlMode, TransferCharacteristics, UsageType, VuiConfig,
};
use openh264::formats::YUVSource;
use openh264::{OpenH264API, Timestamp};
use opus_rs::{Application, OpusEncoder};
use rubato::{FftFixedIn, Resampler};

use super::spec::{Pcm, SinkSummary, VideoSpec};
use crate::error::{PipelineError, Result};

/// Opus always runs at 48 kHz inside MP4.
const OPUS_RATE: u32 = 48_000;
/// 20 ms packets.
const OPUS_FRAME: usize = 960;
/// Encoder look-ahead at 48 kHz (2.5 ms + 4 ms), which muxide signals as the
/// `dOps` pre-skip so players drop it.
const OPUS_PRE_SKIP: usize = 312;
/// OpenH264's largest frame (level 5.2), either orientation.
const MAX_LONG_SIDE: u32 = 3840;
const MAX_SHORT_SIDE: u32 = 2160;

/// An I420 frame in three planes (even dimensions).
struct Yuv420 {
    width: usize,
    height: usize,
    y: Vec<u8>,
    u: Vec<u8>,
    v: Vec<u8>,
}

impl Yuv420 {
    fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            y: vec![0; width * height],
            u: vec![0; width * height / 4],
            v: vec![0; width * height / 4],
        }
    }
}

impl YUVSource for Yuv420 {
    fn dimensions(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    fn strides(&self) -> (usize, usize, usize) {
        (self.width, self.width / 2, self.width / 2)
    }

    fn y(&self) -> &[u8] {
        &self.y
    }

    fn u(&self) -> &[u8] {
        &self.u
    }

    fn v(&self) -> &[u8] {
        &self.v
    }
}

// BT.601 limited range in 16.16 fixed point:
//   Y  = 16  + 219/255 * ( 0.299 R + 0.587 G + 0.114 B)
//   Cb = 128 + 224/255 * (-0.168736 R - 0.331264 G + 0.5 B)
//   Cr = 128 + 224/255 * ( 0.5 R - 0.418688 G - 0.081312 B)
// The chroma rows sum to exactly zero so grey stays grey.
const KY: [i32; 3] = [16829, 33039, 6416];
const KU: [i32; 3] = [-9714, -19070, 28784];
const KV: [i32; 3] = [28784, -24103, -4681];

/// RGB24 -> I420, BT.601 limited range (swscale's default for rgb24 ->
/// yuv420p); chroma is the mean of each 2x2 block (centre-sited).
fn rgb_to_yuv420(rgb: &[u8], out: &mut Yuv420) {
    let (w, h) = (out.width, out.height);
    debug_assert_eq!(rgb.len(), w * h * 3);
    debug_assert!(w % 2 == 0 && h % 2 == 0);
    let luma = |p: &[u8]| -> u8 {
        let v = KY[0] * i32::from(p[0]) + KY[1] * i32::from(p[1]) + KY[2] * i32::from(p[2]);
        ((v + (16 << 16) + (1 << 15)) >> 16).clamp(0, 255) as u8
    };
    let chroma = |k: &[i32; 3], s: [i32; 3]| -> u8 {
        // s are sums of four pixels: scale back by 2^(16 + 2)
        let v = k[0] * s[0] + k[1] * s[1] + k[2] * s[2];
        ((v + (128 << 18) + (1 << 17)) >> 18).clamp(0, 255) as u8
    };
    let row = w * 3;
    for cy in 0..h / 2 {
        let top = &rgb[2 * cy * row..(2 * cy + 1) * row];
        let bottom = &rgb[(2 * cy + 1) * row..(2 * cy + 2) * row];
        let (y_top, y_rest) = out.y[2 * cy * w..(2 * cy + 2) * w].split_at_mut(w);
        for cx in 0..w / 2 {
            let mut s = [0i32; 3];
            for (dy, src) in [top, bottom].into_iter().enumerate() {
                for dx in 0..2 {
                    let x = 2 * cx + dx;
                    let p = &src[x * 3..x * 3 + 3];
                    let yv = luma(p);
                    if dy == 0 {
                        y_top[x] = yv;
                    } else {
                        y_rest[x] = yv;
                    }
                    s[0] += i32::from(p[0]);
                    s[1] += i32::from(p[1]);
                    s[2] += i32::from(p[2]);
                }
            }
            out.u[cy * (w / 2) + cx] = chroma(&KU, s);
            out.v[cy * (w / 2) + cx] = chroma(&KV, s);
        }
    }
}

/// Mono or stereo 48 kHz interleaved samples for Opus: more than two channels
/// are mixed down to mono, other rates resampled.
fn prepare_audio(pcm: &Pcm) -> Result<(Vec<f32>, usize)> {
    let ch_in = usize::from(pcm.channels());
    let frames = pcm.frames();
    let channels = if ch_in <= 2 { ch_in } else { 1 };
    let mut planes: Vec<Vec<f32>> = vec![Vec::with_capacity(frames); channels];
    for frame in pcm.samples().chunks_exact(ch_in) {
        if channels == ch_in {
            for (plane, &s) in planes.iter_mut().zip(frame) {
                plane.push(s);
            }
        } else {
            planes[0].push(frame.iter().sum::<f32>() / ch_in as f32);
        }
    }
    if pcm.sample_rate() != OPUS_RATE {
        planes = resample(&planes, pcm.sample_rate(), OPUS_RATE)?;
    }
    let n = planes[0].len();
    let mut out = Vec::with_capacity(n * channels);
    for i in 0..n {
        for plane in &planes {
            out.push(plane[i].clamp(-1.0, 1.0));
        }
    }
    Ok((out, channels))
}

/// Resamples planar audio, compensating the resampler's delay so the output
/// is `round(n * to / from)` samples aligned with the input.
fn resample(planes: &[Vec<f32>], from: u32, to: u32) -> Result<Vec<Vec<f32>>> {
    let err = |e: &dyn std::fmt::Display| {
        PipelineError::Media(format!("resampling audio {from} Hz -> {to} Hz: {e}"))
    };
    let channels = planes.len();
    let n = planes[0].len();
    let expected = ((n as u64 * u64::from(to) + u64::from(from) / 2) / u64::from(from)) as usize;
    let mut rs = FftFixedIn::<f32>::new(from as usize, to as usize, 1024, 2, channels)
        .map_err(|e| err(&e))?;
    let delay = rs.output_delay();
    let mut out: Vec<Vec<f32>> = vec![Vec::with_capacity(expected + delay + 2048); channels];
    let mut pos = 0;
    while n - pos >= rs.input_frames_next() {
        let take = rs.input_frames_next();
        let chunk: Vec<&[f32]> = planes.iter().map(|p| &p[pos..pos + take]).collect();
        let got = rs.process(&chunk, None).map_err(|e| err(&e))?;
        for (o, g) in out.iter_mut().zip(got) {
            o.extend_from_slice(&g);
        }
        pos += take;
    }
    if pos < n {
        let chunk: Vec<&[f32]> = planes.iter().map(|p| &p[pos..]).collect();
        let got = rs
            .process_partial(Some(&chunk), None)
            .map_err(|e| err(&e))?;
        for (o, g) in out.iter_mut().zip(got) {
            o.extend_from_slice(&g);
        }
    }
    while out[0].len() < expected + delay {
        let got = rs
            .process_partial::<&[f32]>(None, None)
            .map_err(|e| err(&e))?;
        if got[0].is_empty() {
            break;
        }
        for (o, g) in out.iter_mut().zip(got) {
            o.extend_from_slice(&g);
        }
    }
    for o in &mut out {
        o.drain(..delay.min(o.len()));
        o.resize(expected, 0.0);
    }
    Ok(out)
}

/// Encodes 48 kHz interleaved audio into 20 ms Opus packets, covering the
/// pre-skip and the whole signal (the last packet is zero-padded).
fn encode_opus(samples: &[f32], channels: usize, kbps_per_channel: u32) -> Result<Vec<Vec<u8>>> {
    let err = |e: &str| PipelineError::Media(format!("opus encoder: {e}"));
    let mut enc = OpusEncoder::new(OPUS_RATE as i32, channels, Application::Audio).map_err(err)?;
    enc.bitrate_bps = (kbps_per_channel as i32).saturating_mul(1000 * channels as i32);
    let frames = samples.len() / channels;
    let packets = (frames + OPUS_PRE_SKIP).div_ceil(OPUS_FRAME);
    let mut input = vec![0f32; OPUS_FRAME * channels];
    let mut buf = vec![0u8; 4000];
    let mut out = Vec::with_capacity(packets);
    for k in 0..packets {
        let start = (k * OPUS_FRAME * channels).min(samples.len());
        let end = ((k + 1) * OPUS_FRAME * channels).min(samples.len());
        input.fill(0.0);
        input[..end - start].copy_from_slice(&samples[start..end]);
        let len = enc.encode(&input, OPUS_FRAME, &mut buf).map_err(err)?;
        out.push(buf[..len].to_vec());
    }
    Ok(out)
}

/// OpenH264 + muxide writing one MP4.
pub(crate) struct BuiltinSink {
    encoder: Encoder,
    yuv: Yuv420,
    muxer: Muxer<BufWriter<File>>,
    fps: f64,
    index: u64,
    nal: Vec<u8>,
    opus_packets: Vec<Vec<u8>>,
    audio_duration_s: f64,
    video_codec: String,
    audio_codec: String,
}

impl BuiltinSink {
    pub(crate) fn create(out: &Path, width: u32, height: u32, spec: &VideoSpec) -> Result<Self> {
        let settings = &spec.builtin;
        if width.max(height) > MAX_LONG_SIDE || width.min(height) > MAX_SHORT_SIDE {
            return Err(PipelineError::InvalidInput(format!(
                "{width}x{height} is larger than OpenH264 encodes ({MAX_LONG_SIDE}x{MAX_SHORT_SIDE}); use the ffmpeg backend"
            )));
        }
        if !(settings.bits_per_pixel.is_finite() && settings.bits_per_pixel > 0.0) {
            return Err(PipelineError::InvalidInput(format!(
                "bits per pixel {} must be positive",
                settings.bits_per_pixel
            )));
        }
        if !(settings.keyframe_interval_s.is_finite() && settings.keyframe_interval_s > 0.0) {
            return Err(PipelineError::InvalidInput(format!(
                "key frame interval {} s must be positive",
                settings.keyframe_interval_s
            )));
        }

        // 1. audio first: a bad input fails before any frame is encoded
        let pcm = match (&spec.audio.pcm, &spec.audio.file) {
            (Some(pcm), _) => pcm.clone(),
            (None, Some(file)) => {
                let is_wav = file
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("wav"));
                if !is_wav {
                    return Err(PipelineError::Media(format!(
                        "the built-in encoder reads only WAV files itself; decode {} and pass the samples \
                         (AudioInput::with_pcm), or use the ffmpeg backend",
                        file.display()
                    )));
                }
                Pcm::read_wav(file)?
            }
            (None, None) => return Err(PipelineError::InvalidInput("no audio given".into())),
        };
        let audio_duration_s = pcm.duration_s();
        let (samples, channels) = prepare_audio(&pcm)?;
        let opus_packets =
            encode_opus(&samples, channels, settings.audio_bitrate_kbps_per_channel)?;

        // 2. the H.264 encoder
        let mut bitrate =
            (f64::from(settings.bits_per_pixel) * f64::from(width) * f64::from(height) * spec.fps)
                .clamp(100_000.0, 50_000_000.0);
        if let Some(max) = spec.max_bytes {
            // OpenH264's rate control aims at its target without a hard cap: half the
            // budget's rate leaves it room to overshoot.
            let budget = super::spec::size_budget(max, width, height, spec.fps, audio_duration_s)?;
            bitrate = bitrate.min((budget.video_bps / 2.0).max(10_000.0));
        }
        let bitrate = bitrate as u32;
        let keyint = (settings.keyframe_interval_s * spec.fps).round().max(1.0) as u32;
        let config = EncoderConfig::new()
            // OpenH264 accepts only the real-time usage types
            .usage_type(UsageType::CameraVideoRealTime)
            .rate_control_mode(RateControlMode::Bitrate)
            .bitrate(BitRate::from_bps(bitrate))
            .max_frame_rate(FrameRate::from_hz(spec.fps as f32))
            // every frame must come out: the frame count is the contract
            .skip_frames(false)
            .complexity(Complexity::High)
            .intra_frame_period(IntraFramePeriod::from_num_frames(keyint))
            .vui(
                VuiConfig::bt601()
                    .color_primaries(ColorPrimaries::Bt709)
                    .transfer_characteristics(TransferCharacteristics::Srgb),
            );
        let encoder = Encoder::with_api_config(OpenH264API::from_source(), config)
            .map_err(|e| PipelineError::Media(format!("openh264 encoder: {e}")))?;

        // 3. the muxer (holds compressed samples until finish)
        let file = File::create(out).map_err(|e| PipelineError::io(out, e))?;
        let muxer = MuxerBuilder::new(BufWriter::new(file))
            .video(VideoCodec::H264, width, height, spec.fps)
            .audio(AudioCodec::Opus, OPUS_RATE, channels as u16)
            .with_fast_start(true)
            .build()
            .map_err(|e| PipelineError::Media(format!("mp4 muxer: {e}")))?;

        Ok(Self {
            encoder,
            yuv: Yuv420::new(width as usize, height as usize),
            muxer,
            fps: spec.fps,
            index: 0,
            nal: Vec::new(),
            opus_packets,
            audio_duration_s,
            video_codec: format!(
                "h264 constrained baseline (openh264 {} kbit/s)",
                bitrate / 1000
            ),
            audio_codec: format!(
                "opus 48 kHz {channels} ch {} kbit/s",
                settings.audio_bitrate_kbps_per_channel * channels as u32
            ),
        })
    }

    pub(crate) fn audio_duration_s(&self) -> f64 {
        self.audio_duration_s
    }

    pub(crate) fn push(&mut self, frame: &[u8]) -> Result<()> {
        rgb_to_yuv420(frame, &mut self.yuv);
        let pts = self.index as f64 / self.fps;
        let bs = self
            .encoder
            .encode_at(
                &self.yuv,
                Timestamp::from_millis((pts * 1000.0).round() as u64),
            )
            .map_err(|e| {
                PipelineError::Media(format!("openh264 failed on frame {}: {e}", self.index))
            })?;
        let frame_type = bs.frame_type();
        self.nal.clear();
        bs.write_vec(&mut self.nal);
        if self.nal.is_empty() || frame_type == FrameType::Skip || frame_type == FrameType::Invalid
        {
            return Err(PipelineError::Media(format!(
                "openh264 produced no data for frame {} ({frame_type:?})",
                self.index
            )));
        }
        self.muxer
            .write_video(pts, &self.nal, frame_type == FrameType::IDR)
            .map_err(|e| PipelineError::Media(format!("mp4 muxer, frame {}: {e}", self.index)))?;
        self.index += 1;
        Ok(())
    }

    pub(crate) fn finish(self) -> Result<SinkSummary> {
        let Self {
            mut muxer,
            opus_packets,
            video_codec,
            audio_codec,
            ..
        } = self;
        for (k, packet) in opus_packets.iter().enumerate() {
            let pts = (k * OPUS_FRAME) as f64 / f64::from(OPUS_RATE);
            muxer
                .write_audio(pts, packet)
                .map_err(|e| PipelineError::Media(format!("mp4 muxer, audio packet {k}: {e}")))?;
        }
        muxer
            .finish_in_place()
            .map_err(|e| PipelineError::Media(format!("mp4 muxer: {e}")))?;
        muxer
            .into_writer()
            .flush()
            .map_err(|e| PipelineError::Media(format!("writing the mp4: {e}")))?;
        Ok(SinkSummary {
            video_codec,
            audio_codec,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(rgb: [u8; 3]) -> (u8, u8, u8) {
        let mut out = Yuv420::new(2, 2);
        let frame: Vec<u8> = rgb.iter().copied().cycle().take(12).collect();
        rgb_to_yuv420(&frame, &mut out);
        (out.y[0], out.u[0], out.v[0])
    }

    #[test]
    fn bt601_limited_range_matches_the_reference_values() {
        // values of swscale / the BT.601 tables for 8-bit limited range
        assert_eq!(convert([0, 0, 0]), (16, 128, 128));
        assert_eq!(convert([255, 255, 255]), (235, 128, 128));
        assert_eq!(convert([128, 128, 128]), (126, 128, 128));
        assert_eq!(convert([255, 0, 0]), (81, 90, 240));
        assert_eq!(convert([0, 255, 0]), (145, 54, 34));
        assert_eq!(convert([0, 0, 255]), (41, 240, 110));
    }

    #[test]
    fn resampling_keeps_length_and_alignment() -> Result<()> {
        // a 1 kHz tone at 16 kHz, resampled to 48 kHz
        let n = 16_000;
        let tone: Vec<f32> = (0..n)
            .map(|i| (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 16_000.0).sin() * 0.5)
            .collect();
        let out = resample(&[tone], 16_000, 48_000)?;
        assert_eq!(out[0].len(), 48_000);
        // mid-signal samples follow the analytic tone (delay compensated)
        for i in (20_000..20_100).step_by(7) {
            let want = (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 48_000.0).sin() * 0.5;
            assert!(
                (out[0][i] - want).abs() < 0.01,
                "sample {i}: {} vs {want}",
                out[0][i]
            );
        }
        Ok(())
    }

    #[test]
    fn opus_packets_cover_the_signal_and_the_pre_skip() -> Result<()> {
        let samples = vec![0.1f32; 48_000];
        let packets = encode_opus(&samples, 1, 64)?;
        assert_eq!(packets.len(), (48_000 + OPUS_PRE_SKIP).div_ceil(OPUS_FRAME));
        assert!(packets.iter().all(|p| !p.is_empty()));
        Ok(())
    }
}
