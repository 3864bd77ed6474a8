//! `[dataplane]`: the interfaces the XDP program is attached to and the data path's sizes.
use std::path::{Path, PathBuf};

use lb_common::flow::DEFAULT_MAX_FLOWS;
use serde::Deserialize;
use serde_spanned::Spanned;

use super::{ConfigError, Source};

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/xlb";

const MAX_FLOWS_RANGE: std::ops::RangeInclusive<i64> = 1024..=(1 << 24);

/// Linux interface names are at most IFNAMSIZ - 1 bytes.
const MAX_IFNAME_LEN: usize = 15;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataplane {
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    pub max_flows: u32,
    pub pin_path: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// Native (driver) mode where the driver supports it, generic (skb) mode otherwise.
    Auto,
    Native,
    Generic,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDataplane {
    interfaces: Spanned<Vec<Spanned<String>>>,
    xdp_mode: Option<Spanned<String>>,
    max_flows: Option<Spanned<i64>>,
    pin_path: Option<Spanned<String>>,
}


pub(super) fn parse_dataplane(
    src: &Source,
    raw: RawDataplane,
) -> Result<(Dataplane, Vec<usize>), ConfigError> {
    if raw.interfaces.get_ref().is_empty() {
        return Err(src.at(
            &raw.interfaces,
            "dataplane.interfaces is empty; list the interfaces that receive traffic for the \
             services, e.g. [\"eth0\"]",
        ));
    }
    let mut interfaces: Vec<String> = Vec::new();
    let mut lines = Vec::new();
    for name in raw.interfaces.into_inner() {
        let n = name.get_ref();
        if n.is_empty() || n.len() > MAX_IFNAME_LEN || n.contains(['/', ' ', '\0']) {
            return Err(src.at(
                &name,
                format!(
                    "dataplane.interfaces: \"{n}\" is not a valid interface name (1 to \
                     {MAX_IFNAME_LEN} characters, no '/' or spaces); see `ip link` for the names"
                ),
            ));
        }
        if interfaces.contains(n) {
            return Err(src.at(
                &name,
                format!("dataplane.interfaces: \"{n}\" is listed twice; remove one"),
            ));
        }
        lines.push(src.line(name.span().start));
        interfaces.push(name.into_inner());
    }
    let xdp_mode = match &raw.xdp_mode {
        None => XdpMode::Auto,
        Some(mode) => match mode.get_ref().as_str() {
            "auto" => XdpMode::Auto,
            "native" => XdpMode::Native,
            "generic" => XdpMode::Generic,
            other => {
                return Err(src.at(
                    mode,
                    format!(
                        "dataplane.xdp_mode \"{other}\" is not a mode; use \"auto\" (native where \
                         the driver supports it), \"native\" or \"generic\""
                    ),
                ));
            }
        },
    };
    let max_flows = match &raw.max_flows {
        None => DEFAULT_MAX_FLOWS,
        Some(n) if MAX_FLOWS_RANGE.contains(n.get_ref()) => *n.get_ref() as u32,
        Some(n) => {
            return Err(src.at(
                n,
                format!(
                    "dataplane.max_flows {} is out of range; use {}..={} (default {DEFAULT_MAX_FLOWS})",
                    n.get_ref(),
                    MAX_FLOWS_RANGE.start(),
                    MAX_FLOWS_RANGE.end()
                ),
            ));
        }
    };
    let pin_path = match &raw.pin_path {
        None => PathBuf::from(DEFAULT_PIN_PATH),
        Some(p) if Path::new(p.get_ref()).is_absolute() => PathBuf::from(p.get_ref()),
        Some(p) => {
            return Err(src.at(
                p,
                format!(
                    "dataplane.pin_path \"{}\" is not an absolute path; use a directory on the BPF \
                     filesystem such as \"{DEFAULT_PIN_PATH}\"",
                    p.get_ref()
                ),
            ));
        }
    };
    Ok((
        Dataplane {
            interfaces,
            xdp_mode,
            max_flows,
            pin_path,
        },
        lines,
    ))
}

#[cfg(test)]
mod tests {
    use crate::config::fixtures::*;

    #[test]
    fn dataplane_errors() {
        let e = err(&EXAMPLE.replace("[\"eth0\"]", "[]"));
        assert!(
            e.starts_with("/etc/xlb/xlb.toml:2: dataplane.interfaces is empty;"),
            "{e}"
        );
        assert_eq!(
            err(&EXAMPLE.replace("[\"eth0\"]", "[\"eth0\",\n  \"eth0\"]")),
            "/etc/xlb/xlb.toml:3: dataplane.interfaces: \"eth0\" is listed twice; remove one"
        );
        let e = err(&EXAMPLE.replace("[\"eth0\"]", "[\"a-very-long-interface-name\"]"));
        assert!(e.starts_with("/etc/xlb/xlb.toml:2: dataplane.interfaces: \"a-very-long-interface-name\" is not a valid interface name"), "{e}");
        assert_eq!(
            err(&EXAMPLE.replace("\"auto\" ", "\"fast\" ")),
            "/etc/xlb/xlb.toml:3: dataplane.xdp_mode \"fast\" is not a mode; use \"auto\" (native where the \
             driver supports it), \"native\" or \"generic\""
        );
        assert_eq!(
            err(&EXAMPLE.replace("1048576 ", "1023 ")),
            "/etc/xlb/xlb.toml:4: dataplane.max_flows 1023 is out of range; use 1024..=16777216 (default 1048576)"
        );
        assert!(
            err(&EXAMPLE.replace("1048576 ", "16777217 "))
                .contains("max_flows 16777217 is out of range")
        );
        assert!(parse(&EXAMPLE.replace("1048576 ", "16777216 ")).is_ok());
        assert_eq!(
            err(&EXAMPLE.replace("\"/sys/fs/bpf/xlb\"", "\"xlb\"")),
            "/etc/xlb/xlb.toml:5: dataplane.pin_path \"xlb\" is not an absolute path; use a directory on the \
             BPF filesystem such as \"/sys/fs/bpf/xlb\""
        );
    }
}
