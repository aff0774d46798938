//! `capsule logs NAME`: the exec history (from the audit trail) and the boot/serial log.

use std::io::Write;

use capsules_client::Client;
use capsules_core::events::EventKind;
use capsules_core::{Error, ErrorKind, Result};

pub async fn run(client: &Client, name: &str, json: bool) -> Result<()> {
    let h = client.capsule(name)?;
    let events = h.events().await?;
    // A terminated capsule's boot log is gone; its history is not.
    let boot = match h.logs().await {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == ErrorKind::Conflict => Err(e.message().to_owned()),
        Err(e) => return Err(e),
    };
    let execs: Vec<_> = events
        .iter()
        .filter(|e| matches!(e.kind(), EventKind::Exec { .. } | EventKind::Spawned { .. }))
        .collect();
    if json {
        let v = serde_json::json!({
            "execs": execs,
            "boot_log": boot.as_ref().ok().map(|b| String::from_utf8_lossy(b).into_owned()),
            "boot_log_error": boot.as_ref().err(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let mut out = std::io::stdout();
    let w = |out: &mut std::io::Stdout, s: &[u8]| {
        out.write_all(s)
            .map_err(|e| Error::internal("could not write to stdout").with_source(e))
    };
    w(&mut out, b"== exec history ==\n")?;
    if execs.is_empty() {
        w(&mut out, b"(no commands yet)\n")?;
    }
    for e in &execs {
        let line = match e.kind() {
            EventKind::Exec {
                argv,
                exit_code,
                duration_ms,
                error,
            } => {
                let end = match (exit_code, error) {
                    (_, Some(err)) => format!("error: {err}"),
                    (Some(c), None) => format!("exit {c}"),
                    (None, None) => "no exit status".to_owned(),
                };
                format!(
                    "{}  {}  ({end}, {duration_ms} ms)\n",
                    crate::show::at(e.event.at_ms),
                    argv.join(" ")
                )
            }
            EventKind::Spawned { argv, handle } => format!(
                "{}  {}  (background, handle {})\n",
                crate::show::at(e.event.at_ms),
                argv.join(" "),
                handle.as_deref().unwrap_or("-")
            ),
            _ => continue,
        };
        w(&mut out, line.as_bytes())?;
    }
    w(&mut out, b"\n== boot log ==\n")?;
    match boot {
        // The serial log holds the firmware's and kernel's terminal controls (clear screen, no
        // wrap): on a terminal they are shown, not obeyed.
        Ok(b) if std::io::IsTerminal::is_terminal(&std::io::stdout()) => w(&mut out, &tame(&b))?,
        Ok(b) => w(&mut out, &b)?,
        Err(m) => w(&mut out, format!("({m})\n").as_bytes())?,
    }
    Ok(())
}

/// Escape and other control bytes (but newlines and tabs) as `^[`-style text.
fn tame(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    for &c in b {
        match c {
            b'\n' | b'\t' => out.push(c),
            b'\r' => {}
            0..=0x1f => out.extend_from_slice(&[b'^', c + 0x40]),
            0x7f => out.extend_from_slice(b"^?"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn terminal_controls_are_shown_not_obeyed() {
        assert_eq!(
            super::tame(b"\x1bc\x1b[2Jboot\r\nok\tdone\x7f"),
            b"^[c^[[2Jboot\nok\tdone^?"
        );
    }
}
