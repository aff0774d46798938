//! Network links through iproute2 (`ip`): taps (and veth pairs, the stand-in where no VM is attached).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use super::NetError;

/// The alias every link we create carries: `capsules:<capsule id>` — how [`super::Network::sweep`]
/// and a restarted backend know whose a link is.
pub(crate) const ALIAS_PREFIX: &str = "capsules:";

/// Runs `ip` with a fixed path.
#[derive(Debug, Clone)]
pub(crate) struct Ip {
    pub bin: PathBuf,
}

/// A link as `ip -j link show` reports it.
#[derive(Debug, Clone)]
pub(crate) struct LinkInfo {
    pub name: String,
    pub alias: Option<String>,
}

impl Ip {
    pub async fn run(&self, what: &str, args: &[&str]) -> Result<String, NetError> {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| NetError::spawn("ip", &self.bin, e))?;
        let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
            .await
            .map_err(|_| NetError::Command {
                what: what.to_owned(),
                command: format!("ip {}", args.join(" ")),
                detail: "timed out after 20 s".into(),
            })?
            .map_err(|e| NetError::io(format!("waiting for ip ({what})"), e))?;
        if !out.status.success() {
            return Err(NetError::Command {
                what: what.to_owned(),
                command: format!("ip {}", args.join(" ")),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates a persistent tap owned by `owner` (uid, gid).
    pub async fn add_tap(&self, name: &str, owner: Option<(u32, u32)>, multi_queue: bool) -> Result<(), NetError> {
        let (u, g) = owner.map(|(u, g)| (u.to_string(), g.to_string())).unzip();
        let mut args = vec!["tuntap", "add", "dev", name, "mode", "tap"];
        if let (Some(u), Some(g)) = (&u, &g) {
            args.extend(["user", u.as_str(), "group", g.as_str()]);
        }
        if multi_queue {
            args.push("multi_queue");
        }
        self.run(&format!("creating tap {name}"), &args).await.map(|_| ())
    }

    /// Creates a veth pair `name` <-> `peer`.
    pub async fn add_veth(&self, name: &str, peer: &str) -> Result<(), NetError> {
        self.run(
            &format!("creating veth {name}"),
            &["link", "add", "dev", name, "type", "veth", "peer", "name", peer],
        )
        .await
        .map(|_| ())
    }

    /// Labels, addresses and brings up a link we created.
    pub async fn configure(&self, name: &str, capsule_id: &str, host_ip: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
        let alias = format!("{ALIAS_PREFIX}{capsule_id}");
        self.run(
            &format!("labelling {name}"),
            &["link", "set", "dev", name, "alias", &alias],
        )
        .await?;
        let addr = format!("{host_ip}/{prefix}");
        self.run(&format!("addressing {name}"), &["addr", "replace", &addr, "dev", name])
            .await?;
        self.run(&format!("bringing up {name}"), &["link", "set", "dev", name, "up"])
            .await
            .map(|_| ())
    }

    /// Deletes a link; a link that does not exist is not an error.
    pub async fn delete(&self, name: &str) -> Result<(), NetError> {
        match self
            .run(&format!("deleting {name}"), &["link", "del", "dev", name])
            .await
        {
            Ok(_) => Ok(()),
            Err(NetError::Command { detail, .. })
                if detail.contains("Cannot find device") || detail.contains("does not exist") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Whether a link of that name exists (asked over netlink: `/sys/class/net` shows the namespace
    /// sysfs was mounted in, not necessarily ours).
    pub async fn exists(&self, name: &str) -> Result<bool, NetError> {
        match self
            .run(&format!("looking up {name}"), &["link", "show", "dev", name])
            .await
        {
            Ok(_) => Ok(true),
            Err(NetError::Command { detail, .. })
                if detail.contains("does not exist") || detail.contains("Cannot find device") =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// All links of this namespace.
    pub async fn list(&self) -> Result<Vec<LinkInfo>, NetError> {
        let out = self.run("listing links", &["-j", "link", "show"]).await?;
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| NetError::Command {
            what: "listing links".into(),
            command: "ip -j link show".into(),
            detail: format!("unreadable JSON: {e}"),
        })?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| {
                        Some(LinkInfo {
                            name: l.get("ifname")?.as_str()?.to_owned(),
                            alias: l.get("ifalias").and_then(|x| x.as_str()).map(str::to_owned),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}
