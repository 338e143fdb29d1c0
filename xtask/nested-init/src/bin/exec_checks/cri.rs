//! `chitin-exec-checks shim-cri`: containerd's CRI plugin runs pods
//! with chitin's shim, driven over the CRI socket as the kubelet drives
//! it (gRPC, `runtime.v1`), with runtime handler `chitin` (a RuntimeClass
//! in Kubernetes). CNI's bridge plugin gives each pod its network, the
//! pause image and the busybox image are the harness's OCI archive.
//!
//! One pod of two containers checks: one VM for both (the same guest
//! boot id, not L1's) and one shim process, the pod's hostname, its IP
//! answering TCP from L1 from inside the VM, `ExecSync`'s output and
//! exit code, the container's log as CRI writes it, and nothing left
//! after `StopPodSandbox` and `RemovePodSandbox`. Pods with one
//! container then start three times each with chitin and, interleaved,
//! with runc: the time from `RunPodSandbox` to the container's first
//! log line.

use std::path::Path;
use std::time::{Duration, Instant};

use chitin_nested_init::cri::{Client, Fields, Message};
use chitin_testkit::Report as Checks;

use crate::containerd::{
    ctr_ok, jailed_vmm, leftovers, log_tail, median, processes, read_reply, write_shim_config,
    Ground, CHITIN_STATE, CNI_DIR, IMAGE_ARCHIVE, IMAGE_FILE, IMAGE_FILE_TEXT, IMAGE_NAME,
    POD_PORT, POD_REPLY, SHIM_CONFIG, SOCKET,
};

/// The sandbox image (the harness's `containerd::PAUSE_IMAGE_NAME`).
const PAUSE_IMAGE: &str = "docker.io/chitin/pause:test";
/// CRI's CNI configuration directory, and the pods' network.
const CNI_CONF_DIR: &str = "/run/chitin-cri/net.d";
const CNI_CONFLIST: &str = r#"{"cniVersion":"0.4.0","name":"chitin-cri","plugins":[{"type":"bridge","bridge":"cri0","isGateway":true,"ipMasq":false,"ipam":{"type":"host-local","ranges":[[{"subnet":"10.89.0.0/16"}]],"routes":[{"dst":"0.0.0.0/0"}],"dataDir":"/run/chitin-cri/ipam"}}]}"#;
/// The pods' log directories are under this.
const LOGS: &str = "/tmp/chitin-cri/logs";
/// The pods' cgroups (the kubelet's `kubepods`), below the cgroup v2
/// root: pod `P`'s is `POD_CGROUPS/P`, its containers' below it.
const POD_CGROUPS: &str = "chitin-pods";
/// The CRI services.
const RUNTIME: &str = "runtime.v1.RuntimeService";
const IMAGES: &str = "runtime.v1.ImageService";
/// The deadline of one CRI call (a pod start boots a VM under TCG).
const CALL: Duration = Duration::from_secs(120);
/// How long a container may take to print its first line.
const FIRST_LINE_TIMEOUT: Duration = Duration::from_secs(60);
/// The runtime handlers (RuntimeClass handlers) containerd is given.
const CHITIN: &str = "chitin";
const RUNC: &str = "runc";
/// What the app container prints first.
const APP_LINE: &str = "app-started";
/// L1's own files that CRI copies into each pod (created if missing).
const HOST_FILES: [(&str, &str); 2] = [
    ("/etc/hosts", "127.0.0.1 localhost\n"),
    ("/etc/resolv.conf", "nameserver 10.89.0.1\n"),
];

/// containerd's CRI config: the pause image, runc and chitin as runtime
/// handlers (the `runtime_type` the `shim-install` step writes), CNI.
fn plugins() -> String {
    let cri = "[plugins.\"io.containerd.grpc.v1.cri\"";
    format!(
        "{cri}]\n  sandbox_image = \"{PAUSE_IMAGE}\"\n\
         {cri}.containerd]\n  default_runtime_name = \"{RUNC}\"\n\
         {cri}.containerd.runtimes.{RUNC}]\n  runtime_type = \"io.containerd.runc.v2\"\n\
         {cri}.containerd.runtimes.{RUNC}.options]\n  NoPivotRoot = true\n\
         {cri}.containerd.runtimes.{CHITIN}]\n  runtime_type = \"io.containerd.chitin.v2\"\n\
         {cri}.cni]\n  bin_dir = \"{CNI_DIR}\"\n  conf_dir = \"{CNI_CONF_DIR}\"\n"
    )
}

/// A pod's `PodSandboxConfig`: metadata, hostname (its name), log
/// directory, a DNS server, its cgroup parent (as the kubelet's cgroupfs
/// driver gives it).
fn pod_config(name: &str) -> Message {
    Message::new()
        .message(
            1,
            Message::new()
                .string(1, name)
                .string(2, &format!("uid-{name}"))
                .string(3, "default"),
        )
        .string(2, name)
        .string(3, &format!("{LOGS}/{name}"))
        .message(4, Message::new().string(1, "10.89.0.1"))
        .message(
            8,
            Message::new().string(1, &format!("/{POD_CGROUPS}/{name}")),
        )
}

/// The pod's VMM is jailed in cgroup `vmm` below the pod sandbox's
/// (`POD_CGROUPS/<pod>/<sandbox id>`).
fn vmm_cgroup(pod: &Pod) -> Result<String, String> {
    let pid = jailed_vmm()?;
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let want = format!("0::/{POD_CGROUPS}/{}/{}/vmm", pod.name, pod.id);
    if own.trim() != want {
        return Err(format!(
            "the pod VM's cgroup is {:?}, not {want:?}",
            own.trim()
        ));
    }
    Ok(format!(
        "the pod VM's process runs jailed in /{POD_CGROUPS}/{}/<sandbox id>/vmm, below the pod's cgroup",
        pod.name
    ))
}

/// What is left below the pods' cgroups once the pods are gone: the
/// pod-level cgroups (the kubelet's, which the test removes as it
/// would) must hold nothing.
fn pod_cgroups_left() -> Vec<String> {
    let base = Path::new("/sys/fs/cgroup").join(POD_CGROUPS);
    let mut left = Vec::new();
    for pod in std::fs::read_dir(&base).into_iter().flatten().flatten() {
        for inner in std::fs::read_dir(pod.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if inner.path().is_dir() {
                left.push(inner.path().display().to_string());
            }
        }
        let _ = std::fs::remove_dir(pod.path());
    }
    let _ = std::fs::remove_dir(&base);
    left
}

/// A pod as the client knows it.
struct Pod {
    name: String,
    id: String,
}

/// The CRI socket's client and what it has made.
struct Cri {
    client: Client,
}

impl Cri {
    fn call(&mut self, method: &str, request: Message) -> Result<Vec<u8>, String> {
        let service = if method == "ImageStatus" {
            IMAGES
        } else {
            RUNTIME
        };
        self.client.call(service, method, request, CALL)
    }

    /// `RunPodSandbox` with runtime handler `handler`.
    fn run_pod(&mut self, name: &str, handler: &str) -> Result<Pod, String> {
        std::fs::create_dir_all(format!("{LOGS}/{name}")).map_err(|e| e.to_string())?;
        let answer = self.call(
            "RunPodSandbox",
            Message::new()
                .message(1, pod_config(name))
                .string(2, handler),
        )?;
        let id = Fields::parse(&answer)?.string(1)?;
        if id.is_empty() {
            return Err("RunPodSandbox answered no pod id".into());
        }
        Ok(Pod {
            name: name.to_string(),
            id,
        })
    }

    /// `CreateContainer` and `StartContainer` of `command` in the busybox
    /// image, logging to `<name>.log`; the container's id.
    fn start_container(
        &mut self,
        pod: &Pod,
        name: &str,
        command: &[&str],
    ) -> Result<String, String> {
        let config = Message::new()
            .message(1, Message::new().string(1, name))
            .message(2, Message::new().string(1, IMAGE_NAME))
            .strings(3, command)
            .string(11, &format!("{name}.log"));
        let answer = self.call(
            "CreateContainer",
            Message::new()
                .string(1, &pod.id)
                .message(2, config)
                .message(3, pod_config(&pod.name)),
        )?;
        let id = Fields::parse(&answer)?.string(1)?;
        if id.is_empty() {
            return Err(format!("CreateContainer {name} answered no id"));
        }
        self.call("StartContainer", Message::new().string(1, &id))?;
        Ok(id)
    }

    /// `ExecSync`: stdout, stderr, exit code.
    fn exec(&mut self, container: &str, cmd: &[&str]) -> Result<(String, String, i32), String> {
        let answer = self.call(
            "ExecSync",
            Message::new()
                .string(1, container)
                .strings(2, cmd)
                .varint(3, 60),
        )?;
        let f = Fields::parse(&answer)?;
        let text = |n| String::from_utf8_lossy(f.bytes(n).unwrap_or_default()).into_owned();
        // int32 on the wire: a negative code is sign-extended to 64 bits.
        Ok((text(1), text(2), f.varint(3) as i64 as i32))
    }

    /// The pod's state (0: ready) and IP, from `PodSandboxStatus`.
    fn pod_status(&mut self, pod: &Pod) -> Result<(u64, String), String> {
        let answer = self.call("PodSandboxStatus", Message::new().string(1, &pod.id))?;
        let status = Fields::parse(&answer)?.message(1)?;
        Ok((status.varint(3), status.message(5)?.string(1)?))
    }

    /// `StopPodSandbox` then `RemovePodSandbox` (both are idempotent).
    fn remove_pod(&mut self, pod: &Pod) -> Result<(), String> {
        self.call("StopPodSandbox", Message::new().string(1, &pod.id))?;
        self.call("RemovePodSandbox", Message::new().string(1, &pod.id))?;
        Ok(())
    }

    /// Wait until CRI knows `image` (`ctr image import` reaches CRI's
    /// image store through an event).
    fn wait_image(&mut self, image: &str) -> Result<(), String> {
        let t = Instant::now();
        loop {
            let answer = self.call(
                "ImageStatus",
                Message::new().message(1, Message::new().string(1, image)),
            )?;
            if Fields::parse(&answer)?.bytes(1).is_some() {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(30) {
                return Err(format!("CRI does not know {image} 30 s after the import"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The first line of the container log CRI writes for `container` of
/// `pod` (`<time> stdout F <line>`), waited for; the time it was seen
/// from `since`.
fn first_log_line(pod: &str, container: &str, since: Instant) -> Result<(String, u128), String> {
    let path = format!("{LOGS}/{pod}/{container}.log");
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if let Some(line) = text.lines().next() {
            let content = line.splitn(4, ' ').nth(3).unwrap_or_default();
            return Ok((content.to_string(), since.elapsed().as_millis()));
        }
        if since.elapsed() > FIRST_LINE_TIMEOUT {
            return Err(format!("{path} had no line within {FIRST_LINE_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The app container's command: a line, the image's file, then sleep.
fn app_command(script: &mut String) -> [&str; 3] {
    *script = format!("echo {APP_LINE}; cat /{IMAGE_FILE}; exec sleep 1000");
    ["/bin/sh", "-c", script]
}

/// The `shim-cri` scenario.
pub fn shim_cri_checks(kernel: &str, _initramfs: &str, c: &mut Checks) {
    if let Err(e) = write_shim_config(kernel) {
        return c.result("shim-config", Err(e));
    }
    // CRI's streaming server listens on 127.0.0.1, as on any node.
    let flags = std::fs::read_to_string("/sys/class/net/lo/flags").unwrap_or_default();
    println!("chitin-cri: L1's lo flags {}", flags.trim());
    if let Err(e) = chitin_agent::net::set_up("lo") {
        return c.result("cri-setup", Err(format!("lo up: {e}")));
    }
    let made = host_files().and_then(|made| {
        std::fs::create_dir_all(CNI_CONF_DIR)
            .and_then(|()| {
                std::fs::write(format!("{CNI_CONF_DIR}/10-chitin.conflist"), CNI_CONFLIST)
            })
            .map_err(|e| format!("CNI config: {e}"))?;
        Ok(made)
    });
    let made = match made {
        Ok(made) => made,
        Err(e) => return c.result("cri-setup", Err(e)),
    };
    if let Some(ground) = Ground::set_up(Path::new("/tmp/chitin-cri"), &plugins(), c) {
        let log = ground.log.clone();
        let with_log =
            |r: Result<String, String>| r.map_err(|e| format!("{e}; log: {}", log_tail(&log)));
        match connect() {
            Ok(mut cri) => {
                let pod = pod_checks(&mut cri, c);
                c.result("shim-cri-cleanup", with_log(pod.and_then(|()| gone())));
                c.result("shim-cri-start", with_log(side_by_side(&mut cri)));
            }
            Err(e) => c.result("cri-connect", with_log(Err(e))),
        }
        ground.tear_down();
        let cgroups = pod_cgroups_left();
        c.result(
            "shim-cri-leftovers",
            leftovers("k8s.io").and_then(|ok| match cgroups.is_empty() {
                true => Ok(format!("{ok}; no container cgroup below the pods'")),
                false => Err(format!("cgroups left below the pods': {cgroups:?}")),
            }),
        );
    }
    let _ = std::fs::remove_file(SHIM_CONFIG);
    let _ = std::fs::remove_dir_all("/run/chitin-cri");
    for path in made {
        let _ = std::fs::remove_file(path);
    }
}

/// Make L1's `/etc/hosts` and `/etc/resolv.conf` where missing (CRI
/// copies them into pods); the ones made.
fn host_files() -> Result<Vec<&'static str>, String> {
    let mut made = Vec::new();
    for (path, text) in HOST_FILES {
        if !Path::new(path).exists() {
            std::fs::write(path, text).map_err(|e| format!("{path}: {e}"))?;
            made.push(path);
        }
    }
    Ok(made)
}

/// Import the images into CRI's containerd namespace and connect to the
/// CRI socket; CRI knows both images when this returns.
fn connect() -> Result<Cri, String> {
    ctr_ok(&["-n", "k8s.io", "image", "import", IMAGE_ARCHIVE])?;
    let client = Client::connect(Path::new(SOCKET), CALL)?;
    let mut cri = Cri { client };
    let answer = cri.call("Version", Message::new().string(1, "v1"))?;
    let version = Fields::parse(&answer)?;
    println!(
        "chitin-cri: {} {} (CRI {})",
        version.string(2)?,
        version.string(3)?,
        version.string(4)?
    );
    cri.wait_image(IMAGE_NAME)?;
    cri.wait_image(PAUSE_IMAGE)?;
    Ok(cri)
}

/// One chitin pod of two containers; its checks. Removed whatever
/// happens; `Err` if the removal failed.
fn pod_checks(cri: &mut Cri, c: &mut Checks) -> Result<(), String> {
    let pod = match cri.run_pod("chitin-pod", CHITIN) {
        Ok(pod) => pod,
        Err(e) => {
            c.result("shim-cri-pod", Err(e));
            return Ok(());
        }
    };
    pod_steps(cri, &pod, c);
    cri.remove_pod(&pod)
}

fn pod_steps(cri: &mut Cri, pod: &Pod, c: &mut Checks) {
    let mut script = String::new();
    let containers = cri
        .start_container(pod, "app", &app_command(&mut script))
        .and_then(|app| {
            let serve = format!("while true; do echo {POD_REPLY} | nc -l -p {POD_PORT}; done");
            let web = cri.start_container(pod, "web", &["/bin/sh", "-c", &serve])?;
            Ok((app, web))
        });
    let (app, web) = match containers {
        Ok(ids) => ids,
        Err(e) => return c.result("shim-cri-pod", Err(e)),
    };
    c.result("shim-cri-pod", one_vm(cri, pod, &app, &web));
    c.result("shim-cri-jail", vmm_cgroup(pod));
    c.result("shim-cri-exec", exec_check(cri, &app));
    c.result("shim-cri-mounts", files_check(cri, pod, &app));
    c.result("shim-cri-net", pod_ip(cri, pod));
    c.result("shim-cri-logs", app_log(pod));
}

/// Both containers in one VM: the same boot id, not L1's; one shim
/// process; the pod's hostname.
fn one_vm(cri: &mut Cri, pod: &Pod, app: &str, web: &str) -> Result<String, String> {
    let boot_id = ["/bin/cat", "/proc/sys/kernel/random/boot_id"];
    let (a, _, _) = cri.exec(app, &boot_id)?;
    let (b, _, _) = cri.exec(web, &boot_id)?;
    let l1 = std::fs::read_to_string(boot_id[1]).unwrap_or_default();
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() || a != b || a == l1.trim() {
        return Err(format!(
            "boot ids: app {a:?}, web {b:?}, L1 {:?}: not one VM of their own",
            l1.trim()
        ));
    }
    let shims = processes("containerd-shim");
    if shims.len() != 1 {
        return Err(format!("one pod, shim processes {shims:?}"));
    }
    let (host, _, _) = cri.exec(web, &["/bin/hostname"])?;
    if host.trim() != pod.name {
        return Err(format!(
            "hostname {:?} in a pod named {}",
            host.trim(),
            pod.name
        ));
    }
    Ok(format!(
        "RunPodSandbox with runtime handler {CHITIN}, then containers app and web: one shim process and one VM (guest boot id {}..., L1's is another), hostname {}",
        &a[..8.min(a.len())],
        pod.name
    ))
}

/// `ExecSync` returns stdout, stderr and the exit code.
fn exec_check(cri: &mut Cri, app: &str) -> Result<String, String> {
    let script = format!("cat /{IMAGE_FILE}; echo to-stderr >&2; exit 3");
    let got = cri.exec(app, &["/bin/sh", "-c", &script])?;
    let want = (format!("{IMAGE_FILE_TEXT}\n"), "to-stderr\n".to_string(), 3);
    if got != want {
        return Err(format!("ExecSync answered {got:?}, not {want:?}"));
    }
    Ok("ExecSync answered the image's file on stdout, a line on stderr and exit code 3".into())
}

/// The files CRI binds into each container (the image has none of
/// them): `/etc/resolv.conf` from the pod's DNS config, `/etc/hosts`,
/// and `/etc/hostname` with the pod's name.
fn files_check(cri: &mut Cri, pod: &Pod, app: &str) -> Result<String, String> {
    let script = "cat /etc/resolv.conf; echo ---; cat /etc/hostname; echo ---; \
                  grep -c localhost /etc/hosts; grep -c ' /etc/resolv.conf ' /proc/self/mountinfo";
    let (out, err, code) = cri.exec(app, &["/bin/sh", "-c", script])?;
    let parts: Vec<&str> = out.split("---\n").collect();
    let ok = code == 0
        && parts.len() == 3
        && parts[0].lines().any(|l| l.trim() == "nameserver 10.89.0.1")
        && parts[1].trim() == pod.name
        && parts[2]
            .lines()
            .all(|l| l.trim().parse::<u32>().is_ok_and(|n| n > 0));
    if !ok {
        return Err(format!(
            "CRI's files in the container: {out:?} {err:?} exit {code}"
        ));
    }
    Ok(format!(
        "CRI's bind mounts of host files reached the container through the pod's share: /etc/resolv.conf (nameserver 10.89.0.1), /etc/hostname ({}), /etc/hosts",
        pod.name
    ))
}

/// The pod is ready and its IP (from `PodSandboxStatus`) answers TCP
/// from L1.
fn pod_ip(cri: &mut Cri, pod: &Pod) -> Result<String, String> {
    let (state, ip) = cri.pod_status(pod)?;
    if state != 0 {
        return Err(format!("PodSandboxStatus: state {state}, not ready"));
    }
    let addr: std::net::Ipv4Addr = ip
        .parse()
        .map_err(|_| format!("PodSandboxStatus: IP {ip:?}"))?;
    let reply = read_reply(addr)?;
    Ok(format!(
        "PodSandboxStatus: ready, IP {ip} (CNI bridge); a TCP connection from L1 to {ip}:{POD_PORT} was answered from inside the VM ({reply:?})"
    ))
}

/// The app's log, as CRI wrote it from the shim's stdout FIFO.
fn app_log(pod: &Pod) -> Result<String, String> {
    let path = format!("{LOGS}/{}/app.log", pod.name);
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter_map(|l| l.splitn(4, ' ').nth(3))
            .collect();
        if lines == [APP_LINE, IMAGE_FILE_TEXT] {
            return Ok(format!("CRI's log of app ({path}) holds its two lines"));
        }
        if t.elapsed() > FIRST_LINE_TIMEOUT {
            return Err(format!("{path} holds {text:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// After the pod's removal: no shim process (within 30 s: containerd
/// shuts it down), shim directory or mount.
fn gone() -> Result<String, String> {
    let t = Instant::now();
    loop {
        let shims = processes("containerd-shim");
        let dirs: Vec<String> = std::fs::read_dir(format!("{CHITIN_STATE}/k8s.io"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mounts: Vec<&str> = mountinfo
            .lines()
            .filter(|l| l.contains(CHITIN_STATE))
            .collect();
        if shims.is_empty() && dirs.is_empty() && mounts.is_empty() {
            return Ok(format!(
                "StopPodSandbox and RemovePodSandbox left no shim process, shim directory or mount (after {} ms)",
                t.elapsed().as_millis()
            ));
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err(format!(
                "after RemovePodSandbox: shims {shims:?}, directories {dirs:?}, mounts {mounts:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A pod of one container with `handler`: from `RunPodSandbox` to the
/// container's first log line, in ms; the pod is removed afterwards.
fn timed_pod(cri: &mut Cri, handler: &str, name: &str) -> Result<u128, String> {
    let t = Instant::now();
    let pod = cri.run_pod(name, handler)?;
    let mut script = String::new();
    let first = cri
        .start_container(&pod, "app", &app_command(&mut script))
        .and_then(|_| first_log_line(name, "app", t));
    let removed = cri.remove_pod(&pod);
    let (line, ms) = first?;
    removed?;
    if line != APP_LINE {
        return Err(format!("{handler} pod {name}: first log line {line:?}"));
    }
    Ok(ms)
}

/// Three one-container pods with runc and three with chitin,
/// interleaved: RunPodSandbox to the first log line.
fn side_by_side(cri: &mut Cri) -> Result<String, String> {
    let (mut runc, mut chitin) = (Vec::new(), Vec::new());
    for round in 0..3 {
        runc.push(timed_pod(cri, RUNC, &format!("runc-{round}"))?);
        chitin.push(timed_pod(cri, CHITIN, &format!("chitin-{round}"))?);
    }
    let (r, ch) = (median(&runc), median(&chitin));
    Ok(format!(
        "RunPodSandbox -> the container's first log line, median of 3: runc {r} ms {runc:?}, chitin {ch} ms {chitin:?}, chitin/runc {:.2}",
        ch as f64 / r.max(1) as f64
    ))
}
