//! The deployment files: the Dockerfile, and the Kubernetes manifests as
//! `kubectl kustomize` renders them.
//!
//! The manifest checks need `kubectl` (kustomize is built into it), which a
//! developer's machine may lack: they are system tests, run (and required) by
//! `.ci/system/50-kubernetes.sh`. The image itself is built, run and checked by
//! `.ci/system/60-container.sh`. The Dockerfile's static checks run everywhere.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use sink::pipeline::Pipeline;
use sink_api::StageKind;
use sink_e2e::sink_binary;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn dockerfile() -> String {
    std::fs::read_to_string(root().join("Dockerfile")).expect("read Dockerfile")
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() && current.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(start) => current.push_str(start),
            None => {
                current.push_str(line);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    joined
        .into_iter()
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
            (word.to_uppercase(), rest.trim().to_string())
        })
        .collect()
}

/// The environment the image gives its process (`ENV K=V ...` of the last stage).
fn image_env() -> HashMap<String, String> {
    let all = instructions(&dockerfile());
    let last_from = all
        .iter()
        .rposition(|(word, _)| word == "FROM")
        .expect("FROM");
    all[last_from..]
        .iter()
        .filter(|(word, _)| word == "ENV")
        .flat_map(|(_, rest)| {
            rest.split_whitespace()
                .map(|pair| {
                    let (key, value) = pair.split_once('=').expect("ENV K=V");
                    (key.to_string(), value.to_string())
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every instruction `word` of the runtime stage.
fn runtime_instructions(word: &str) -> Vec<String> {
    let all = instructions(&dockerfile());
    let last_from = all.iter().rposition(|(w, _)| w == "FROM").expect("FROM");
    all[last_from..]
        .iter()
        .filter(|(w, _)| w == word)
        .map(|(_, rest)| rest.clone())
        .collect()
}

/// The one instruction `word` of the runtime stage.
fn runtime_instruction(word: &str) -> String {
    let found = runtime_instructions(word);
    assert_eq!(found.len(), 1, "{word}: {found:?}");
    found[0].clone()
}

#[test]
fn the_image_runs_as_a_numeric_non_root_user_with_a_health_check() {
    // Kubernetes' runAsNonRoot can verify only a numeric user.
    let user = runtime_instruction("USER");
    let uid: u32 = user
        .split(':')
        .next()
        .and_then(|uid| uid.parse().ok())
        .unwrap_or_else(|| panic!("USER {user} is not numeric"));
    assert_ne!(uid, 0);
    assert_eq!(runtime_instruction("STOPSIGNAL"), "SIGTERM");
    let health = runtime_instruction("HEALTHCHECK");
    assert!(
        health.contains(r#"CMD ["/usr/local/bin/sink", "health"]"#),
        "{health}"
    );
    assert_eq!(runtime_instruction("VOLUME"), r#"["/var/lib/sink"]"#);
}

#[test]
fn the_image_labels_carry_the_workspace_version() {
    let text = dockerfile();
    let version = instructions(&text)
        .into_iter()
        .find_map(|(word, rest)| {
            let version = rest.strip_prefix("VERSION=")?;
            (word == "ARG").then(|| version.to_string())
        })
        .expect("ARG VERSION=");
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    for label in ["source", "version", "licenses", "revision"] {
        assert!(
            text.contains(&format!("org.opencontainers.image.{label}=")),
            "{label}"
        );
    }
}

#[test]
fn the_images_default_pipeline_listens_everywhere_and_writes_on_the_volume() {
    let env = image_env();
    let pipeline = env.get("SINK_PIPELINE").expect("ENV SINK_PIPELINE");
    let text = image_pipeline(pipeline);
    let parsed = parse(Path::new(pipeline), &text, &env);
    let address = grpc_address(&parsed);
    assert!(address.ip().is_unspecified(), "{address}");
    assert_eq!(address.port(), 8000);
    let workdir = runtime_instruction("WORKDIR");
    for path in file_paths(&parsed, Path::new(&workdir)) {
        assert!(path.starts_with("/var/lib/sink"), "{}", path.display());
    }
}

/// A pipeline the image holds at `/etc/sink/NAME`: the repository's
/// `pipelines/NAME`, as the Dockerfile copies it.
fn image_pipeline(path: &str) -> String {
    let name = path
        .strip_prefix("/etc/sink/")
        .unwrap_or_else(|| panic!("{path} is not a pipeline the image holds"));
    let copied = runtime_instructions("COPY").into_iter().any(|copy| {
        copy.ends_with(" /etc/sink/")
            && copy
                .split_whitespace()
                .any(|from| from == format!("pipelines/{name}"))
    });
    assert!(
        copied,
        "the Dockerfile does not copy pipelines/{name} to /etc/sink/"
    );
    std::fs::read_to_string(root().join("pipelines").join(name)).expect("read pipeline")
}

fn parse(file: &Path, text: &str, env: &HashMap<String, String>) -> Pipeline {
    Pipeline::parse(file, text, |name| env.get(name).cloned())
        .unwrap_or_else(|errors| panic!("{errors}"))
}

/// The listen address of the pipeline's one grpc source.
fn grpc_address(pipeline: &Pipeline) -> SocketAddr {
    let addresses: Vec<&str> = pipeline
        .stages
        .iter()
        .filter(|stage| stage.kind == StageKind::Source && stage.type_name == "grpc")
        .filter_map(|stage| stage.params.get("address")?.as_str())
        .collect();
    assert_eq!(addresses.len(), 1, "{addresses:?}");
    addresses[0]
        .parse()
        .unwrap_or_else(|err| panic!("{}: {err}", addresses[0]))
}

/// Every file a json_file sink writes, relative paths taken from `workdir`.
fn file_paths(pipeline: &Pipeline, workdir: &Path) -> Vec<PathBuf> {
    let paths: Vec<PathBuf> = pipeline
        .stages
        .iter()
        .filter(|stage| stage.type_name == "json_file")
        .filter_map(|stage| stage.params.get("path")?.as_str())
        .map(|path| workdir.join(path))
        .collect();
    assert!(!paths.is_empty(), "the pipeline writes no file");
    paths
}

/// `kubectl kustomize deploy/kubernetes/<dir>`, as JSON objects. kubectl has
/// no offline YAML-to-JSON command, but its `--local` mode prints the objects
/// it read as JSON; the label it is asked to add is ignored.
fn render(dir: &str) -> Vec<Value> {
    let path = root().join("deploy/kubernetes").join(dir);
    let yaml = kubectl(&["kustomize", path.to_str().expect("utf-8 path")], None);
    let json = kubectl(
        &[
            "label",
            "--local",
            "-f",
            "-",
            "-o",
            "json",
            "rendered-for=test",
        ],
        Some(&yaml),
    );
    serde_json::Deserializer::from_str(&json)
        .into_iter::<Value>()
        .map(|object| object.expect("kubectl printed JSON"))
        .collect()
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write as _;
    let mut child = Command::new("kubectl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl is not installed: .ci/system/50-kubernetes.sh needs it");
    let mut pipe = child.stdin.take().expect("stdin");
    pipe.write_all(stdin.unwrap_or("").as_bytes())
        .expect("write to kubectl");
    drop(pipe);
    let output = child.wait_with_output().expect("kubectl");
    assert!(
        output.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

/// The objects of one `kind`.
fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects
        .iter()
        .filter(|object| object["kind"] == kind)
        .collect()
}

fn only<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(objects, kind);
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    of_kind(objects, kind)
        .into_iter()
        .find(|object| object["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|values| values.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// What one rendered deployment runs, followed through its objects.
struct Deployment<'a> {
    objects: &'a [Value],
    pod: &'a Value,
    container: &'a Value,
    /// The pipeline file's path in the container.
    pipeline_path: String,
}

impl<'a> Deployment<'a> {
    fn of(objects: &'a [Value]) -> Self {
        let set = only(objects, "StatefulSet");
        let pod = &set["spec"]["template"]["spec"];
        let containers = pod["containers"].as_array().expect("containers");
        assert_eq!(containers.len(), 1);
        let container = &containers[0];
        let args: Vec<&str> = strings(&container["command"])
            .into_iter()
            .chain(strings(&container["args"]))
            .collect();
        let pipeline_path = args
            .iter()
            .position(|arg| *arg == "--pipeline")
            .map(|at| args[at + 1].to_string())
            .or_else(|| Self::env_of(objects, container).remove("SINK_PIPELINE"))
            .expect("no --pipeline nor SINK_PIPELINE");
        Self {
            objects,
            pod,
            container,
            pipeline_path,
        }
    }

    /// The container's environment: the image's, then envFrom, then env.
    fn env_of(objects: &[Value], container: &Value) -> HashMap<String, String> {
        let mut env = image_env();
        for source in container["envFrom"].as_array().into_iter().flatten() {
            let name = source["configMapRef"]["name"]
                .as_str()
                .expect("configMapRef");
            let map = named(objects, "ConfigMap", name);
            for (key, value) in map["data"].as_object().expect("data") {
                env.insert(key.clone(), value.as_str().expect("string").to_string());
            }
        }
        for var in container["env"].as_array().into_iter().flatten() {
            let value = var["value"].as_str().expect("env value");
            env.insert(var["name"].as_str().expect("name").into(), value.into());
        }
        env
    }

    fn env(&self) -> HashMap<String, String> {
        Self::env_of(self.objects, self.container)
    }

    fn mounts(&self) -> &'a [Value] {
        self.container["volumeMounts"]
            .as_array()
            .map_or(&[], Vec::as_slice)
    }

    fn volume(&self, name: &str) -> &'a Value {
        self.pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|volume| volume["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    }

    /// The mount whose directory holds `path`.
    fn mount_holding(&self, path: &Path) -> Option<&'a Value> {
        self.mounts()
            .iter()
            .find(|mount| path.starts_with(mount["mountPath"].as_str().expect("mountPath")))
    }

    /// The pipeline's text: from a mounted ConfigMap (checked to be mounted
    /// as a whole directory, under a stable name), or the image's own.
    fn pipeline_text(&self) -> String {
        let path = Path::new(&self.pipeline_path);
        let Some(mount) = self.mount_holding(path) else {
            return image_pipeline(&self.pipeline_path);
        };
        assert!(
            mount.get("subPath").is_none() && mount.get("subPathExpr").is_none(),
            "the pipeline is mounted with subPath, which never sees an update: {mount}"
        );
        let directory = Path::new(mount["mountPath"].as_str().expect("mountPath"));
        assert_eq!(
            path.parent(),
            Some(directory),
            "the file is not at the mount's top"
        );
        let volume = self.volume(mount["name"].as_str().expect("name"));
        let name = volume["configMap"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{} is not a ConfigMap volume", path.display()));
        // A stable name: kustomize's hash suffix would make every edit a new
        // ConfigMap and a rolling restart instead of a live reload.
        assert_eq!(name, "telemetry-sink-pipeline");
        let map = named(self.objects, "ConfigMap", name);
        let key = path
            .file_name()
            .expect("file name")
            .to_str()
            .expect("utf-8");
        map["data"][key]
            .as_str()
            .unwrap_or_else(|| panic!("ConfigMap {name} has no {key}"))
            .to_string()
    }

    /// The container port named `grpc`.
    fn grpc_port(&self) -> u64 {
        self.container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|port| port["name"] == "grpc")
            .and_then(|port| port["containerPort"].as_u64())
            .expect("a container port named grpc")
    }

    /// Every check the issue names, on one rendered deployment.
    fn check(&self) {
        let env = self.env();
        let text = self.pipeline_text();

        // `sink validate` (the real binary) accepts it, with the container's environment.
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("pipeline.toml");
        std::fs::write(&file, &text).expect("write");
        let output = Command::new(sink_binary())
            .arg("validate")
            .arg("--pipeline")
            .arg(&file)
            .env_clear()
            .envs(&env)
            .output()
            .expect("run sink validate");
        assert!(
            output.status.success(),
            "sink validate refused the deployed pipeline: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let pipeline = parse(Path::new(&self.pipeline_path), &text, &env);

        // Reachable from the Services and the kubelet, on the probed port.
        let address = grpc_address(&pipeline);
        assert!(
            !address.ip().is_loopback(),
            "listens on loopback: {address}"
        );
        let port = self.grpc_port();
        assert_eq!(u64::from(address.port()), port);
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(
                self.container[probe]["grpc"]["port"].as_u64(),
                Some(port),
                "{probe} is not a gRPC probe on the gRPC port"
            );
        }
        // Readiness follows the pipeline (NOT_SERVING while stalled or a sink
        // has failed); liveness asks the `liveness` service, SERVING while
        // the process serves, so that a full pipeline is not restarted.
        assert!(
            self.container["readinessProbe"]["grpc"]["service"].is_null(),
            "the readiness probe must ask the whole server"
        );
        assert_eq!(
            self.container["livenessProbe"]["grpc"]["service"].as_str(),
            Some("liveness"),
            "the liveness probe must ask the `liveness` health service"
        );
        let services = of_kind(self.objects, "Service");
        assert_eq!(services.len(), 2);
        for service in &services {
            let ports = service["spec"]["ports"].as_array().expect("ports");
            assert!(
                ports
                    .iter()
                    .all(|p| p["targetPort"] == "grpc" && p["appProtocol"] == "grpc"),
                "{service}"
            );
        }
        assert!(
            services.iter().any(|s| s["spec"]["clusterIP"] == "None"),
            "no headless Service"
        );

        // The grace period outlasts the drain.
        let grace = self.pod["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30);
        assert!(
            grace > pipeline.settings.shutdown_timeout.as_secs(),
            "terminationGracePeriodSeconds {grace} <= shutdown_timeout {:?}",
            pipeline.settings.shutdown_timeout
        );

        // Files go to the pod's own volume claim (the root filesystem is read-only).
        let claims: Vec<&str> = self
            .objects
            .iter()
            .filter(|o| o["kind"] == "StatefulSet")
            .flat_map(|set| {
                set["spec"]["volumeClaimTemplates"]
                    .as_array()
                    .into_iter()
                    .flatten()
            })
            .filter_map(|claim| claim["metadata"]["name"].as_str())
            .collect();
        let workdir = runtime_instruction("WORKDIR");
        for path in file_paths(&pipeline, Path::new(&workdir)) {
            let mount = self
                .mount_holding(&path)
                .unwrap_or_else(|| panic!("{} is on the read-only root", path.display()));
            assert!(
                claims.contains(&mount["name"].as_str().expect("name")),
                "{mount}"
            );
        }

        // Restricted security context.
        let pod_context = &self.pod["securityContext"];
        let context = &self.container["securityContext"];
        let either = |key: &str| {
            let value = &context[key];
            if value.is_null() {
                &pod_context[key]
            } else {
                value
            }
        };
        assert_eq!(either("runAsNonRoot"), true);
        assert_ne!(either("runAsUser").as_u64(), Some(0));
        assert_eq!(either("seccompProfile")["type"], "RuntimeDefault");
        assert_eq!(context["allowPrivilegeEscalation"], false);
        assert_eq!(context["readOnlyRootFilesystem"], true);
        assert_eq!(strings(&context["capabilities"]["drop"]), ["ALL"]);
        assert!(context["capabilities"]["add"].is_null());

        // Sized, protected from voluntary disruption, scaled on CPU.
        for kind in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(
                    self.container["resources"][kind][resource].is_string(),
                    "no {kind}.{resource}"
                );
            }
        }
        let budget = only(self.objects, "PodDisruptionBudget");
        let labels = &self.pod_labels();
        for (key, value) in budget["spec"]["selector"]["matchLabels"]
            .as_object()
            .expect("selector")
        {
            assert_eq!(&labels[key], value, "the budget does not select the pods");
        }
        let scaler = only(self.objects, "HorizontalPodAutoscaler");
        assert_eq!(scaler["spec"]["scaleTargetRef"]["kind"], "StatefulSet");
        assert_eq!(scaler["spec"]["metrics"][0]["resource"]["name"], "cpu");
        assert!(
            only(self.objects, "StatefulSet")["spec"]["replicas"].is_null(),
            "replicas in the manifest would undo the autoscaler on every apply"
        );
    }

    fn pod_labels(&self) -> Value {
        only(self.objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"].clone()
    }
}

#[test]
#[ignore = "system test: run by .ci/system/50-kubernetes.sh"]
fn the_base_is_a_complete_deployment_that_reloads_its_configmap_live() {
    let objects = render("base");
    let deployment = Deployment::of(&objects);
    assert_eq!(deployment.pipeline_path, "/etc/sink/pipeline/pipeline.toml");
    deployment.check();
    // `kubectl apply -k deploy/kubernetes` is the base.
    assert_eq!(render(""), objects);
}

#[test]
#[ignore = "system test: run by .ci/system/50-kubernetes.sh"]
fn the_original_env_overlay_runs_the_original_pipeline_on_its_env_file() {
    let objects = render("original-env");
    let deployment = Deployment::of(&objects);
    assert_eq!(deployment.pipeline_path, "/etc/sink/original-env.toml");
    deployment.check();
    let env = deployment.env();
    for key in sink::env::ORIGINAL_VARS {
        assert!(env.contains_key(key), "{key} is not set");
    }
}
