//! Failures are errors with a reason, and never leave a file (half-written or
//! silent) at the output path.

mod video_common;

use std::path::Path;

use echomimic_pipeline::video::{probe_ffmpeg, AudioInput, EncoderBackend, VideoSpec, VideoWriter};
use echomimic_pipeline::{AudioError, PipelineError};
use video_common::*;

fn spec_with_file(file: &Path, backend: EncoderBackend) -> VideoSpec {
    VideoSpec::new(64, 64, AudioInput::file(file)).with_backend(backend)
}

#[test]
fn missing_audio_file_fails_and_writes_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for backend in BACKENDS {
        let spec = spec_with_file(&dir.path().join("nope.wav"), backend);
        let err = VideoWriter::create(dir.path().join("out.mp4"), &spec)
            .expect_err("missing audio must fail");
        assert!(
            matches!(err, PipelineError::MissingFile(_)),
            "{backend}: {err}"
        );
    }
    assert!(folder_entries(dir.path())?.is_empty());
    Ok(())
}

#[test]
fn corrupt_audio_fails_and_writes_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let bad_wav = dir.path().join("bad.wav");
    std::fs::write(&bad_wav, b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunkjunk")?;
    let not_audio = dir.path().join("notes.mp3");
    std::fs::write(&not_audio, "this is a text file, not audio\n".repeat(20))?;
    for (file, backend) in [
        (&bad_wav, EncoderBackend::Ffmpeg),
        (&not_audio, EncoderBackend::Ffmpeg),
        (&bad_wav, EncoderBackend::Builtin),
    ] {
        let spec = spec_with_file(file, backend);
        let err = VideoWriter::create(dir.path().join("out.mp4"), &spec)
            .expect_err("corrupt audio must fail");
        eprintln!("{backend} {}: {err}", file.display());
        assert!(
            matches!(err, PipelineError::Audio(AudioError::Corrupt(_))),
            "{backend} {}: {err}",
            file.display()
        );
        assert!(err.is_bad_input());
    }
    assert_eq!(folder_entries(dir.path())?, vec!["bad.wav", "notes.mp3"]);
    Ok(())
}

#[test]
fn wrong_frame_size_is_an_error_and_leaves_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for backend in BACKENDS {
        let spec = speech_spec(64, 48, backend);
        let mut w = VideoWriter::create(dir.path().join("out.mp4"), &spec)?;
        w.write_frame(&moving_gradient(64, 48, 0))?;
        let err = w
            .write_frame(&moving_gradient(48, 64, 1)[..64 * 47 * 3])
            .expect_err("short frame");
        assert!(
            matches!(err, PipelineError::InvalidInput(_)),
            "{backend}: {err}"
        );
        assert!(err.to_string().contains("expected 9216"), "{err}");
        drop(w);
        assert!(folder_entries(dir.path())?.is_empty(), "{backend}");
    }
    Ok(())
}

#[test]
fn an_unfinished_writer_leaves_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for backend in BACKENDS {
        let spec = speech_spec(64, 64, backend);
        let mut w = VideoWriter::create(dir.path().join("out.mp4"), &spec)?;
        for i in 0..5 {
            w.write_frame(&moving_gradient(64, 64, i))?;
        }
        drop(w);
        assert!(folder_entries(dir.path())?.is_empty(), "{backend}");
    }
    Ok(())
}

#[test]
fn no_frames_or_no_audio_are_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for backend in BACKENDS {
        let w = VideoWriter::create(dir.path().join("out.mp4"), &speech_spec(64, 64, backend))?;
        let err = w.finish().expect_err("no frames");
        assert!(matches!(err, PipelineError::InvalidInput(_)), "{err}");
        let spec = VideoSpec::new(64, 64, AudioInput::default()).with_backend(backend);
        let err = VideoWriter::create(dir.path().join("out.mp4"), &spec).expect_err("no audio");
        assert!(err.to_string().contains("needs its audio"), "{err}");
    }
    let err = VideoWriter::create(
        dir.path().join("out.mp4"),
        &speech_spec(64, 64, EncoderBackend::Auto).with_fps(0.0),
    )
    .expect_err("fps 0");
    assert!(matches!(err, PipelineError::InvalidInput(_)), "{err}");
    assert!(folder_entries(dir.path())?.is_empty());
    Ok(())
}

#[test]
fn a_missing_ffmpeg_is_reported_with_how_to_fix_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = Path::new("/nonexistent/bin/ffmpeg");
    let err = probe_ffmpeg(Some(missing)).expect_err("no such program");
    let msg = err.to_string();
    assert!(
        msg.contains("apt-get install ffmpeg") && msg.contains("ECHOMIMIC_FFMPEG"),
        "{msg}"
    );

    let mut spec = speech_spec(64, 64, EncoderBackend::Ffmpeg);
    spec.ffmpeg.binary = Some(missing.to_path_buf());
    let err = VideoWriter::create(dir.path().join("out.mp4"), &spec).expect_err("ffmpeg required");
    assert!(err.to_string().contains("ffmpeg not found"), "{err}");
    assert!(folder_entries(dir.path())?.is_empty());

    let info = probe_ffmpeg(None)?;
    assert!(info.version.starts_with("ffmpeg version"), "{info:?}");
    Ok(())
}

#[test]
fn the_builtin_encoder_asks_for_samples_when_given_a_non_wav_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let flac = dir.path().join("speech.flac");
    std::fs::copy(speech_wav(), &flac)?;
    let err = VideoWriter::create(
        dir.path().join("out.mp4"),
        &spec_with_file(&flac, EncoderBackend::Builtin),
    )
    .expect_err("builtin cannot decode flac itself");
    assert!(err.to_string().contains("AudioInput::with_pcm"), "{err}");
    assert_eq!(folder_entries(dir.path())?, vec!["speech.flac"]);
    Ok(())
}

/// A program that passed the check is not run again for the next check (every video writer
/// checks its encoder); one that failed is checked again, so a fix is seen.
#[cfg(unix)]
#[test]
fn a_passed_ffmpeg_check_is_remembered_and_a_failed_one_is_not() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let bin = tempfile::tempdir()?;
    let runs = bin.path().join("runs");
    let program = bin.path().join("counting-ffmpeg");
    let write = |body: &str| -> anyhow::Result<()> {
        let script = format!("#!/bin/sh\necho run >> '{}'\n{body}\n", runs.display());
        std::fs::write(&program, script)?;
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755))?;
        Ok(())
    };
    let count = || std::fs::read_to_string(&runs).map_or(0, |s| s.lines().count());
    // A script just written can be refused with ETXTBSY while another test's process,
    // forked in that moment, still holds the write descriptor until its exec: try again.
    let probe = || loop {
        match probe_ffmpeg(Some(&program)) {
            Err(e) if e.to_string().contains("Text file busy") => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => break other,
        }
    };
    write("echo 'broken build' >&2; exit 1")?;
    probe().expect_err("the program fails");
    probe().expect_err("still failing");
    assert_eq!(count(), 2, "a failure is checked again each time");
    write("exec ffmpeg \"$@\"")?;
    let first = probe()?;
    assert_eq!(count(), 3, "one run: -encoders");
    let again = probe()?;
    assert_eq!(count(), 3, "the passed check is remembered");
    assert_eq!(first, again);
    Ok(())
}

/// A stand-in `ffmpeg` that behaves like the real one except for the final
/// encode, where it runs `encode_body` (POSIX sh).
#[cfg(unix)]
fn fake_ffmpeg(dir: &Path, encode_body: &str) -> anyhow::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("fake-ffmpeg");
    let script = format!(
        "#!/bin/sh\nfor a in \"$@\"; do\n  if [ \"$a\" = libx264 ]; then\n{encode_body}\n  fi\ndone\nexec ffmpeg \"$@\"\n"
    );
    std::fs::write(&path, script)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

#[cfg(unix)]
#[test]
fn an_ffmpeg_failure_carries_its_stderr_and_leaves_nothing() -> anyhow::Result<()> {
    let bin = tempfile::tempdir()?;
    let fake = fake_ffmpeg(
        bin.path(),
        "    echo 'simulated failure: No space left on device' >&2\n    exit 1",
    )?;
    let dir = tempfile::tempdir()?;
    let mut spec = speech_spec(64, 64, EncoderBackend::Ffmpeg);
    spec.ffmpeg.binary = Some(fake);
    let result = (|| -> echomimic_pipeline::Result<_> {
        let mut w = VideoWriter::create(dir.path().join("out.mp4"), &spec)?;
        for i in 0..40 {
            w.write_frame(&moving_gradient(64, 64, i))?;
        }
        w.finish()
    })();
    let err = result.expect_err("the encode fails");
    eprintln!("{err}");
    assert!(matches!(err, PipelineError::Media(_)), "{err}");
    assert!(err.to_string().contains("No space left on device"), "{err}");
    assert!(folder_entries(dir.path())?.is_empty());
    Ok(())
}

/// If the mux silently loses the audio (the EchoMe worker then uploaded a
/// silent video), the writer refuses the file.
#[cfg(unix)]
#[test]
fn a_video_that_lost_its_audio_is_refused() -> anyhow::Result<()> {
    let bin = tempfile::tempdir()?;
    // re-run the real ffmpeg with `-an` inserted before the output path
    let fake = fake_ffmpeg(
        bin.path(),
        "    n=$#; i=0\n    for b in \"$@\"; do i=$((i+1)); if [ $i -eq $n ]; then set -- \"$@\" -an \"$b\"; else set -- \"$@\" \"$b\"; fi; shift; done\n    exec ffmpeg \"$@\"",
    )?;
    let dir = tempfile::tempdir()?;
    let mut spec = speech_spec(64, 64, EncoderBackend::Ffmpeg);
    spec.ffmpeg.binary = Some(fake);
    let err =
        encode(&dir.path().join("out.mp4"), &spec, 40).expect_err("silent video must be refused");
    eprintln!("{err}");
    assert!(
        err.to_string()
            .contains("refusing to deliver a silent video"),
        "{err}"
    );
    assert!(folder_entries(dir.path())?.is_empty());
    Ok(())
}
