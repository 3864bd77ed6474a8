//! `[dataplane]`: the interfaces the XDP program is attached to and the data path's sizes.
use std::path::{Path, PathBuf};

use lb_common::flow::DEFAULT_MAX_FLOWS;
use serde::{Deserialize, Deserializer};
use serde_spanned::Spanned;

use super::{from_str_with, own_error, own_error_at};

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/xlb";

const MAX_FLOWS_RANGE: std::ops::RangeInclusive<i64> = 1024..=(1 << 24);

/// Linux interface names are at most IFNAMSIZ - 1 bytes.
const MAX_IFNAME_LEN: usize = 15;

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dataplane {
    #[serde(deserialize_with = "interfaces")]
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub xdp_mode: XdpMode,
    #[serde(default = "default_max_flows", deserialize_with = "max_flows")]
    pub max_flows: u32,
    #[serde(default = "default_pin_path", deserialize_with = "pin_path")]
    pub pin_path: PathBuf,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpMode {
    /// Native (driver) mode where the driver supports it, generic (skb) mode otherwise.
    #[default]
    Auto,
    Native,
    Generic,
}

impl<'de> Deserialize<'de> for XdpMode {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<XdpMode, D::Error> {
        from_str_with(de, |mode| match mode {
            "auto" => Ok(XdpMode::Auto),
            "native" => Ok(XdpMode::Native),
            "generic" => Ok(XdpMode::Generic),
            other => Err(format!(
                "dataplane.xdp_mode \"{other}\" is not a mode; use \"auto\" (native where \
                 the driver supports it), \"native\" or \"generic\""
            )),
        })
    }
}

/// Each name is checked where it is written, so the error names its line.
fn interfaces<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<String>, D::Error> {
    let list = Vec::<Spanned<String>>::deserialize(de)?;
    if list.is_empty() {
        return Err(own_error(
            "dataplane.interfaces is empty; list the interfaces that receive traffic for the \
             services, e.g. [\"eth0\"]",
        ));
    }
    let mut interfaces: Vec<String> = Vec::new();
    for name in list {
        let n = name.get_ref();
        if n.is_empty() || n.len() > MAX_IFNAME_LEN || n.contains(['/', ' ', '\0']) {
            return Err(own_error_at(
                &name,
                format!(
                    "dataplane.interfaces: \"{n}\" is not a valid interface name (1 to \
                     {MAX_IFNAME_LEN} characters, no '/' or spaces); see `ip link` for the names"
                ),
            ));
        }
        if interfaces.contains(n) {
            return Err(own_error_at(&name, format!("dataplane.interfaces: \"{n}\" is listed twice; remove one")));
        }
        interfaces.push(name.into_inner());
    }
    Ok(interfaces)
}

fn default_max_flows() -> u32 {
    DEFAULT_MAX_FLOWS
}

fn max_flows<'de, D: Deserializer<'de>>(de: D) -> Result<u32, D::Error> {
    let n = i64::deserialize(de)?;
    if !MAX_FLOWS_RANGE.contains(&n) {
        return Err(own_error(format!(
            "dataplane.max_flows {n} is out of range; use {}..={} (default {DEFAULT_MAX_FLOWS})",
            MAX_FLOWS_RANGE.start(),
            MAX_FLOWS_RANGE.end()
        )));
    }
    Ok(n as u32)
}

fn default_pin_path() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_PATH)
}

fn pin_path<'de, D: Deserializer<'de>>(de: D) -> Result<PathBuf, D::Error> {
    from_str_with(de, |p| {
        if !Path::new(p).is_absolute() {
            return Err(format!(
                "dataplane.pin_path \"{p}\" is not an absolute path; use a directory on the BPF \
                 filesystem such as \"{DEFAULT_PIN_PATH}\""
            ));
        }
        Ok(PathBuf::from(p))
    })
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
