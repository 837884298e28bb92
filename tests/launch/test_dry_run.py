"""Every launch script's --dry_run plan: the commands and flags it must contain.

The plans are parsed back with shlex (they are printed as shell words), and the remote
scripts of tpu_vm.sh are checked with `bash -n`. gcloud, srun and sbatch are replaced by
stubs that record any call: a dry run must call none of them.
"""

import os
import re
import shlex
import subprocess
import tarfile

import pytest

from tests.launch.conftest import REPO

LAUNCH = REPO / "launch"
# Binary flags with characters a shell would otherwise split or expand.
TRICKY_ARGS = ["--workdir=gs://bucket/runs/lm", "--config.model.mixers=('gla','softmax')",
               "--config.data.path=/data/my books/$HOME"]


@pytest.fixture
def stubs(tmp_path):
  """A PATH directory whose gcloud/srun/sbatch record their calls in `called`."""
  directory = tmp_path / "bin"
  directory.mkdir()
  for name in ("gcloud", "srun", "sbatch"):
    stub = directory / name
    stub.write_text(f"#!/bin/sh\necho {name} \"$@\" >> {tmp_path}/called\nexit 1\n")
    stub.chmod(0o755)
  yield directory
  assert not (tmp_path / "called").exists(), (tmp_path / "called").read_text()


def plan(stubs, script, *args, env=None, returncode=0):
  """Runs `script --dry_run args` (no --dry_run if args has one); returns its commands."""
  environ = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "NCCL_", "CUDA_VISIBLE"))}
  environ.update(PATH=f"{stubs}:{os.environ['PATH']}", **(env or {}))
  result = subprocess.run(["bash", str(LAUNCH / script), *args], env=environ,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == returncode, result.stderr
  if returncode:
    return result.stderr
  return split_commands(result.stdout)


def split_commands(text):
  """Shell words of each command of a printed plan (commands may span lines)."""
  commands, pending = [], ""
  for line in text.splitlines():
    if not pending and (line.startswith("#") or not line.strip()):
      continue
    pending = f"{pending}\n{line}" if pending else line
    try:
      commands.append(shlex.split(pending))
    except ValueError:  # an open quote: the command goes on
      continue
    pending = ""
  assert not pending, f"unterminated command: {pending}"
  return commands


def before_redirects(words):
  """The command itself: its words before `2>&1`, `>`, `|` or `&`."""
  for i, word in enumerate(words):
    if word in ("2>&1", ">", ">>", "|", "&"):
      return words[:i]
  return words


def find(commands, *prefix):
  return [c for c in commands if c[:len(prefix)] == list(prefix)]


def remote_script(command):
  (flag,) = [w for w in command if w.startswith("--command=")]
  script = flag[len("--command="):]
  check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
  assert check.returncode == 0, f"remote script does not parse: {check.stderr}\n{script}"
  return script


# ---- tpu_vm.sh ---------------------------------------------------------------------------

TPU = ("--name=lm-v6e", "--zone=us-east5-b", "--project=proj")
SSH = ("gcloud", "compute", "tpus", "tpu-vm", "ssh", "lm-v6e", "--zone=us-east5-b",
       "--project=proj")


def test_tpu_vm_creates_syncs_installs_runs_and_streams(stubs):
  commands = plan(stubs, "tpu_vm.sh", "--dry_run", *TPU, "--accelerator_type=v6e-16",
                  "--spot", "--env=LIBTPU_INIT_ARGS=--xla_tpu_flag=true", "--", *TRICKY_ARGS)
  where = ["--zone=us-east5-b", "--project=proj"]
  describe, create, pack, scp, extract, install, start, stream = commands
  assert describe == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "lm-v6e", *where,
                      "--format=value(state)"]
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "lm-v6e", *where,
                    "--accelerator-type=v6e-16", "--version=v2-alpha-tpuv6e", "--spot"]
  tarball = pack[-1]
  assert pack == ["python3", str(LAUNCH / "pack_code.py"), tarball]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                 "lm-v6e:attn_jax-code.tar.gz", *where, "--worker=all"]
  for command in (extract, install, start):
    assert command[:len(SSH)] == list(SSH) and "--worker=all" in command
  assert stream[:len(SSH)] == list(SSH) and "--worker=0" in stream

  assert "tar -xzf ~/attn_jax-code.tar.gz -C ~/attn_jax" in remote_script(extract)
  pinned = re.search(r"^jax==(.+)$", (REPO / "requirements/constraints.txt").read_text(),
                     re.M).group(1)
  script = remote_script(install)
  assert "python3.12" in script
  assert (f"./dev.sh python -m pip install -q -c requirements/constraints.txt "
          f"'jax[tpu]=={pinned}' gcsfs") in script

  script = remote_script(start)
  (launch_line,) = [line for line in script.splitlines() if line.startswith("nohup ")]
  words = shlex.split(launch_line)
  assert before_redirects(words) == [
      "nohup", "env", "PYTHONUNBUFFERED=1", "LIBTPU_INIT_ARGS=--xla_tpu_flag=true",
      ".venv/bin/python", "-m", "experiments.train", "--distributed", *TRICKY_ARGS]
  log = words[words.index(">>") + 1]
  assert re.fullmatch(r"~/attn_jax-logs/train-\d{8}-\d{6}\.log", log)
  assert "~/attn_jax-logs/train.pid" in script and "still running" in script
  assert "tail -n +1 -F" in remote_script(stream) and log in remote_script(stream)


def test_tpu_vm_queued_resource_for_v5e(stubs):
  commands = plan(stubs, "tpu_vm.sh", "--dry_run", *TPU, "--accelerator_type=v5litepod-16",
                  "--queued", "--no_stream", "--", "--workdir=/tmp/w")
  assert commands[0][:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe",
                             "lm-v6e"]
  (create,) = find(commands, "gcloud", "compute", "tpus", "queued-resources", "create")
  assert create[5:] == ["lm-v6e", "--node-id=lm-v6e", "--zone=us-east5-b", "--project=proj",
                        "--accelerator-type=v5litepod-16",
                        "--runtime-version=v2-alpha-tpuv5-lite"]
  assert "gcsfs" not in remote_script(commands[-2])  # no gs:// workdir
  assert "--worker=0" not in commands[-1]  # --no_stream


def test_tpu_vm_steps_can_be_left_out(stubs):
  commands = plan(stubs, "tpu_vm.sh", "--dry_run", *TPU, "--skip_create", "--skip_sync",
                  "--skip_install", "--no_stream", "--binary=experiments.evaluate",
                  "--run_name=eval", "--", "--workdir=gs://b/run")
  (start,) = commands
  script = remote_script(start)
  assert ".venv/bin/python -m experiments.evaluate --workdir=gs://b/run >>" in script
  assert "--distributed" not in script  # only experiments.train defines it
  assert "~/attn_jax-logs/eval.pid" in script


def test_tpu_vm_stop_and_logs(stubs):
  (stop,) = plan(stubs, "tpu_vm.sh", "--dry_run", *TPU, "--stop")
  assert "--worker=all" in stop
  assert 'kill -TERM "$(cat ~/attn_jax-logs/train.pid)"' in remote_script(stop)
  (logs,) = plan(stubs, "tpu_vm.sh", "--dry_run", *TPU, "--logs")
  assert "--worker=0" in logs
  assert remote_script(logs).endswith("~/attn_jax-logs/train.log")


def test_tpu_vm_deletes_nothing(stubs):
  for args in (("--accelerator_type=v6e-8",), ("--stop",), ("--logs",)):
    for command in plan(stubs, "tpu_vm.sh", "--dry_run", *TPU, *args):
      text = " ".join(command)
      assert "delete" not in text and not re.search(r"\brm\b", text), text


def test_tpu_vm_dry_run_without_accelerator_type_does_not_claim_the_vm_is_missing(stubs):
  """A dry run looks nothing up, so it cannot know whether the VM exists: it plans the
  reuse and says what the real run does if the VM is not found."""
  environ = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}
  result = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "--dry_run", *TPU,
                           "--no_stream", "--", "--workdir=/w"], env=environ,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert "does not exist" not in result.stdout + result.stderr
  assert "a dry run looks nothing up" in result.stdout
  assert "not found: the real run stops and asks for --accelerator_type" in result.stdout
  commands = split_commands(result.stdout)
  assert commands[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "lm-v6e"]
  assert not find(commands, "gcloud", "compute", "tpus", "tpu-vm", "create")
  assert len(find(commands, *SSH)) == 3  # extract, install, start


@pytest.mark.parametrize("args, message", [
    ((), "--name is required"),
    (("--name=x",), "--zone is required"),
    (("--name=Bad_Name", "--zone=z"), "--name must be lower-case"),
    (("--name=x", "--zone=z", "--workdir=/w"), "unknown flag '--workdir=/w'"),
    (("--name=x", "--zone=z", "--accelerator_type=v9-8"), "no default --version"),
])
def test_tpu_vm_errors_name_the_flag(stubs, args, message):
  assert message in plan(stubs, "tpu_vm.sh", "--dry_run", *args, returncode=2)


# ---- gpu_multinode.sh, slurm_gpu.sbatch --------------------------------------------------

def gpu_processes(commands):
  """{process_id: (env dict, binary words)} of a gpu_multinode/local plan."""
  out = {}
  for command in commands:
    words = before_redirects(command)
    assert words[0] == "env"
    i = next(i for i, w in enumerate(words) if w.endswith("python"))
    env = dict(w.split("=", 1) for w in words[1:i])
    args = words[i + 1:]
    process_id = int(next(a for a in args if a.startswith("--process_id="))[13:])
    out[process_id] = (env, args)
  return out


def test_gpu_one_process_per_gpu(stubs):
  commands = plan(stubs, "gpu_multinode.sh", "--dry_run", "--coordinator=10.0.0.1:1234",
                  "--num_nodes=2", "--node_rank=1", "--gpus_per_node=4", "--",
                  *TRICKY_ARGS, env={"NCCL_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "eth0"})
  assert commands[-1] == ["wait"]
  processes = gpu_processes(commands[:-1])
  assert sorted(processes) == [4, 5, 6, 7]
  for process_id, (env, args) in processes.items():
    assert env["CUDA_VISIBLE_DEVICES"] == str(process_id - 4)
    assert env["NCCL_DEBUG"] == "INFO" and env["NCCL_SOCKET_IFNAME"] == "eth0"
    assert env["NCCL_NVLS_ENABLE"] == "0"
    assert args == ["-m", "experiments.train", "--coordinator_address=10.0.0.1:1234",
                    "--num_processes=8", f"--process_id={process_id}", *TRICKY_ARGS]


def test_gpu_one_process_per_host_of_the_visible_gpus(stubs):
  commands = plan(stubs, "gpu_multinode.sh", "--dry_run", "--mode=per_host",
                  "--coordinator=head:9999", "--num_nodes=4", "--node_rank=2", "--", "--x=1",
                  env={"CUDA_VISIBLE_DEVICES": "2,3,5"})
  ((env, args),) = gpu_processes(commands[:-1]).values()
  assert env["CUDA_VISIBLE_DEVICES"] == "2,3,5" and env["NCCL_DEBUG"] == "WARN"
  assert args[2:] == ["--coordinator_address=head:9999", "--num_processes=4",
                      "--process_id=2", "--x=1"]


def test_gpu_ranks_from_slurm(stubs):
  slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
           "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu-[07-08]",
           "CUDA_VISIBLE_DEVICES": "0,1"}
  processes = gpu_processes(plan(stubs, "gpu_multinode.sh", "--dry_run", "--slurm", "--",
                                 "--w=1", env=slurm)[:-1])
  assert sorted(processes) == [2, 3]
  for env, args in processes.values():
    assert "--coordinator_address=gpu-07:14242" in args and "--num_processes=4" in args
  slurm["SLURM_NTASKS"] = "16"
  error = plan(stubs, "gpu_multinode.sh", "--dry_run", "--slurm", env=slurm, returncode=2)
  assert "one task per node" in error


@pytest.mark.parametrize("args, message", [
    (("--num_nodes=2", "--node_rank=0", "--gpus_per_node=1"), "--coordinator must be"),
    (("--num_nodes=2", "--node_rank=2", "--coordinator=h:1"), "--node_rank=2 must be <"),
    (("--mode=per_core", "--coordinator=h:1"), "--mode must be"),
    (("--slurm",), "outside a SLURM job"),
])
def test_gpu_errors_name_the_flag(stubs, args, message):
  assert message in plan(stubs, "gpu_multinode.sh", "--dry_run", *args, returncode=2)


def test_slurm_batch_script(stubs):
  header = (LAUNCH / "slurm_gpu.sbatch").read_text()
  for line in ("#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
               "#SBATCH --signal=TERM@", "#SBATCH --requeue"):
    assert line in header
  slurm = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "0",
           "SLURM_JOB_NODELIST": "n1,n2", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
           "MODE": "per_host"}
  commands = plan(stubs, "slurm_gpu.sbatch", "--dry_run", "--", *TRICKY_ARGS, env=slurm)
  assert commands[0] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                         str(LAUNCH / "gpu_multinode.sh"), "--slurm", "--mode=per_host",
                         "--", *TRICKY_ARGS]
  ((env, args),) = gpu_processes(commands[1:-1]).values()
  assert args[2:5] == ["--coordinator_address=n1:10007", "--num_processes=2",
                       "--process_id=0"]


# ---- local.sh ------------------------------------------------------------------------------

def test_local_processes_share_a_coordinator(stubs):
  commands = plan(stubs, "local.sh", "--dry_run", "--num_processes=3",
                  "--devices_per_process=2", "--port=5555", "--", *TRICKY_ARGS)
  processes = gpu_processes(commands[:-1])
  assert sorted(processes) == [0, 1, 2]
  for process_id, (env, args) in processes.items():
    assert env["JAX_PLATFORMS"] == "cpu"
    assert env["XLA_FLAGS"].endswith("--xla_force_host_platform_device_count=2")
    assert args == ["-m", "experiments.train", "--coordinator_address=localhost:5555",
                    "--num_processes=3", f"--process_id={process_id}", *TRICKY_ARGS]


@pytest.mark.parametrize("script", ["local.sh", "gpu_multinode.sh"])
@pytest.mark.parametrize("venv, want", [(None, "REPO/.venv"), ("envs/a", "REPO/envs/a"),
                                        ("/opt/venv", "/opt/venv")])
def test_processes_run_the_python_of_attn_jax_venv(stubs, script, venv, want):
  """$ATTN_JAX_VENV as ./dev.sh takes it: relative to the repository, or absolute (empty
  or unset: .venv)."""
  env = {"ATTN_JAX_VENV": venv or ""}
  args = ["--coordinator=10.0.0.1:1234"] if script == "gpu_multinode.sh" else []
  commands = plan(stubs, script, "--dry_run", *args, env=env)
  pythons = {next(w for w in before_redirects(c) if w.endswith("python"))
             for c in commands if c[0] == "env"}
  assert pythons == {want.replace("REPO", str(REPO)) + "/bin/python"}


@pytest.mark.parametrize("script", ["tpu_vm.sh", "gpu_multinode.sh", "local.sh",
                                    "slurm_gpu.sbatch"])
def test_help(stubs, script):
  result = subprocess.run(["bash", str(LAUNCH / script), "--help"], capture_output=True,
                          text=True, timeout=30)
  assert result.returncode == 0 and "--dry_run" in result.stdout
  assert "#!/" not in result.stdout and "#SBATCH --" not in result.stdout


def test_pack_code_takes_what_git_would_commit(tmp_path):
  tarball = tmp_path / "code.tar.gz"
  subprocess.run(["python3", str(LAUNCH / "pack_code.py"), str(tarball)], check=True,
                 capture_output=True, timeout=120)
  with tarfile.open(tarball) as tar:
    members = {m.name: m for m in tar.getmembers()}
  assert {"dev.sh", "setup.cfg", "requirements/constraints.txt", "launch/tpu_vm.sh",
          "launch/colab/load_checkpoint.ipynb", "attn_jax/__init__.py"} <= members.keys()
  assert members["dev.sh"].mode & 0o100, "dev.sh must stay executable"
  assert not [n for n in members if n.startswith((".venv", ".git/", "workdirs/"))
              or "__pycache__" in n]


@pytest.mark.parametrize("script, flag", [
    ("local.sh", "--log_dir"), ("gpu_multinode.sh", "--coordinator"),
    ("tpu_vm.sh", "--name"), ("slurm_gpu.sbatch", "--config.workdir")])
def test_control_characters_in_a_flag_value_are_rejected(stubs, script, flag, tmp_path):
  """A newline in a flag value would end a comment line of the plan and run when the plan
  is sourced: every script refuses it and names the flag."""
  marker = tmp_path / "ran"
  value = f"{flag}=x\ntouch {marker}"
  args = ("--dry_run", "--", value) if script == "slurm_gpu.sbatch" else ("--dry_run", value)
  message = plan(stubs, script, *args, returncode=2)
  assert f"argument {flag} holds a control character" in message
  assert not marker.exists()
