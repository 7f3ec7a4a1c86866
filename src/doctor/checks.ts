import { execFile } from 'node:child_process';
import { accessSync, constants, existsSync, readFileSync, statSync } from 'node:fs';
import { release } from 'node:os';
import { delimiter, dirname, join } from 'node:path';
import { layerPath, packageRoot } from '../package-root.js';
import { KubeError, loadKubeAccess, type KubeAccess } from '../platform/kube/kubeconfig.js';
import { commandProblem } from '../cli/mirror-settings.js';
import { UNHOOKABLE_MEANS, commandHookability } from '../cli/unhookable.js';

export type CheckStatus = 'ok' | 'warn' | 'fail';

export interface CheckResult {
  id: 'kernel' | 'bpf' | 'privileges' | 'addon' | 'layer' | 'kubeconfig' | 'program';
  title: string;
  status: CheckStatus;
  /** One line: what was found. */
  detail: string;
  /** One line, for a status other than ok: what to do about it. */
  fix?: string;
}

export interface DoctorOptions {
  /** A kubeconfig file given by the user, which then wins over KUBECONFIG and ~/.kube/config. */
  kubeconfig?: string;
  /** The kubeconfig context to check instead of the current one. */
  context?: string;
  /** A COMMAND for `mirrord mirror`, checked too: whether it can be run, and hooked. */
  command?: string;
}

export interface DoctorReport {
  checks: CheckResult[];
  /** True when no check failed; warnings are allowed. */
  ok: boolean;
}

const RINGBUF_KERNEL: [number, number] = [5, 8];
const TCX_KERNEL: [number, number] = [6, 6];

/** How long the API server may take to answer GET /version. */
const KUBECONFIG_FIX =
  "point KUBECONFIG or --kubeconfig at your cluster's config, and --context at one of its contexts";
const API_TIMEOUT_MS = 3000;

const CAP_NET_ADMIN = 12n;
const CAP_SYS_PTRACE = 19n;
const CAP_SYS_ADMIN = 21n;
const CAP_BPF = 39n;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
  /** Set when the program could not be started at all. */
  spawnError?: string;
}

function run(file: string, args: string[], env: NodeJS.ProcessEnv = process.env): Promise<Run> {
  return new Promise((resolve) => {
    execFile(file, args, { env, timeout: 30_000 }, (error, stdout, stderr) => {
      const code = error ? (typeof error.code === 'number' ? error.code : 1) : 0;
      const spawnError = error && typeof error.code === 'string' ? error.message : undefined;
      resolve({ code, stdout, stderr, spawnError });
    });
  });
}

function firstLine(text: string): string {
  return (
    text
      .split('\n')
      .map((line) => line.trim())
      .find(Boolean) ?? ''
  );
}

function atLeast(version: [number, number], wanted: [number, number]): boolean {
  return version[0] > wanted[0] || (version[0] === wanted[0] && version[1] >= wanted[1]);
}

export function checkKernel(kernelRelease = release()): CheckResult {
  const base = { id: 'kernel', title: 'kernel' } as const;
  const match = /^(\d+)\.(\d+)/.exec(kernelRelease);
  if (!match) {
    return {
      ...base,
      status: 'warn',
      detail: `cannot read a version from "${kernelRelease}"`,
      fix: 'mirroring needs Linux 5.8 or later (BPF ring buffer)',
    };
  }
  const version: [number, number] = [Number(match[1]), Number(match[2])];
  if (!atLeast(version, RINGBUF_KERNEL)) {
    return {
      ...base,
      status: 'fail',
      detail: `Linux ${kernelRelease}: no BPF ring buffer (needs 5.8 or later)`,
      fix: 'run mirrord (and its agent) on a machine with Linux 5.8 or later',
    };
  }
  const attach = atLeast(version, TCX_KERNEL)
    ? 'TCX links (6.6+) available'
    : 'no TCX links (6.6+): the legacy tc filter is used, one agent per netns';
  return { ...base, status: 'ok', detail: `Linux ${kernelRelease}: BPF ring buffer, ${attach}` };
}

/** bpftool lives in sbin, which an unprivileged user's PATH often lacks. */
function findBpftool(): string | undefined {
  const dirs = [...(process.env.PATH ?? '').split(delimiter), '/usr/sbin', '/sbin'];
  for (const dir of dirs.filter(Boolean)) {
    const path = join(dir, 'bpftool');
    try {
      accessSync(path, constants.X_OK);
      return path;
    } catch {
      // Not in this directory.
    }
  }
  return undefined;
}

interface BpftoolProbe {
  error?: string;
  program_types?: Record<string, boolean>;
  map_types?: Record<string, boolean>;
}

async function probeBpf(bpftool: string, unprivileged: boolean): Promise<BpftoolProbe> {
  const args = ['feature', 'probe', 'kernel', ...(unprivileged ? ['unprivileged'] : []), '-j'];
  const result = await run(bpftool, args);
  try {
    return JSON.parse(result.stdout) as BpftoolProbe;
  } catch {
    const reason = result.spawnError ?? (firstLine(result.stderr) || `exit code ${result.code}`);
    return { error: `bpftool feature probe failed: ${reason}` };
  }
}

/** bpftool: "missing CAP_SYS_ADMIN, CAP_BPF, …, required for full feature probing; run as root…" */
function lacking(refusal: string): string {
  return /missing (.*?),? required/.exec(refusal)?.[1] ?? firstLine(refusal);
}

/**
 * bpftool's probe really creates a ring buffer map and loads a sched_cls (TC) program with the
 * credentials it inherits from this process, and attaches nothing.
 */
export async function checkBpf(): Promise<CheckResult> {
  const base = { id: 'bpf', title: 'BPF' } as const;
  const bpftool = findBpftool();
  if (!bpftool) {
    return {
      ...base,
      status: 'warn',
      detail: 'bpftool not found: cannot probe what BPF this process may use',
      fix: 'install bpftool (apt-get install bpftool), or run scripts/setup.sh',
    };
  }
  let probe = await probeBpf(bpftool, false);
  // A full probe needs privileges; without them, what an unprivileged process may do is the answer.
  const refused = probe.error;
  if (refused) probe = await probeBpf(bpftool, true);
  if (probe.error) {
    return { ...base, status: 'fail', detail: probe.error, fix: 'run as root (sudo mirrord …)' };
  }
  const ringbuf = probe.map_types?.have_ringbuf_map_type === true;
  const schedCls = probe.program_types?.have_sched_cls_prog_type === true;
  const found = `ring buffer map ${ringbuf ? 'yes' : 'no'}, TC (sched_cls) program ${schedCls ? 'yes' : 'no'}`;
  if (refused) {
    return {
      ...base,
      status: 'fail',
      detail: `this process lacks ${lacking(refused)}; unprivileged: ${found}`,
      fix: 'run as root (sudo mirrord …)',
    };
  }
  if (!ringbuf || !schedCls) {
    return {
      ...base,
      status: 'fail',
      detail: `this kernel cannot: ${found}`,
      fix: 'use a kernel with BPF ring buffers (5.8+) and TC BPF programs (CONFIG_NET_CLS_BPF)',
    };
  }
  return { ...base, status: 'ok', detail: `${found} (bpftool probe)` };
}

/** The effective capability set of this process. */
function effectiveCapabilities(): bigint | undefined {
  const status = readFileSync('/proc/self/status', 'utf8');
  const hex = /^CapEff:\s*([0-9a-f]+)$/m.exec(status)?.[1];
  return hex === undefined ? undefined : BigInt(`0x${hex}`);
}

export function checkPrivileges(capabilities = effectiveCapabilities()): CheckResult {
  const base = { id: 'privileges', title: 'privileges' } as const;
  if (capabilities === undefined) {
    return {
      ...base,
      status: 'warn',
      detail: 'no CapEff line in /proc/self/status',
      fix: 'run as root (sudo mirrord …)',
    };
  }
  const has = (bit: bigint): boolean => ((capabilities >> bit) & 1n) === 1n;
  const missing: string[] = [];
  // Loading BPF programs and maps: CAP_BPF, or CAP_SYS_ADMIN on its own.
  if (!has(CAP_BPF) && !has(CAP_SYS_ADMIN)) missing.push('CAP_BPF (load BPF)');
  if (!has(CAP_NET_ADMIN)) missing.push('CAP_NET_ADMIN (attach to interfaces)');
  if (!has(CAP_SYS_ADMIN)) missing.push('CAP_SYS_ADMIN (enter the target netns)');
  const required = missing.length;
  if (!has(CAP_SYS_PTRACE)) missing.push("CAP_SYS_PTRACE (read other users' /proc/PID/ns)");
  if (missing.length === 0) {
    return {
      ...base,
      status: 'ok',
      detail: 'CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_SYS_PTRACE are effective',
    };
  }
  return {
    ...base,
    // Without CAP_SYS_PTRACE only targets run by other users are out of reach.
    status: required ? 'fail' : 'warn',
    detail: `missing ${missing.join(', ')}`,
    fix: 'run as root (sudo mirrord …) for local targets and the agent',
  };
}

/** Run by `node -e` with the addon's path: its error message, one line, on stderr. */
const LOAD_ADDON = `
try {
  if (typeof require(process.argv[1]).open !== 'function') throw new Error('it exports no open()');
} catch (error) {
  process.stderr.write(String(error.message));
  process.exit(1);
}`;

/** Loaded in a child: a broken addon may crash the process that loads it. */
export async function checkAddon(
  path = join(packageRoot(), 'build', 'Release', 'mirrord_tap.node'),
): Promise<CheckResult> {
  const base = { id: 'addon', title: 'tap addon' } as const;
  const fix = 'run npm run build';
  if (!existsSync(path)) return { ...base, status: 'fail', detail: `${path} is missing`, fix };
  const result = await run(process.execPath, ['-e', LOAD_ADDON, path]);
  if (result.code !== 0) {
    const reason = result.spawnError ?? (firstLine(result.stderr) || `exit code ${result.code}`);
    // dlopen's message starts with the path, which the detail already names.
    const why = reason.startsWith(`${path}: `) ? reason.slice(path.length + 2) : reason;
    return { ...base, status: 'fail', detail: `${path} does not load: ${why}`, fix };
  }
  return { ...base, status: 'ok', detail: `${path} loads (the BPF object is built into it)` };
}

/** Each directory above `path` must let other users through for them to open it. */
function unreadableByOthers(path: string): string | undefined {
  if ((statSync(path).mode & 0o004) === 0) return `${path} is not readable by other users`;
  for (let dir = dirname(path); ; dir = dirname(dir)) {
    if ((statSync(dir).mode & 0o001) === 0) return `${dir} is not searchable by other users`;
    if (dirname(dir) === dir) return undefined;
  }
}

/**
 * Preloaded into cat reading its own memory map: the layer is loaded if the map names it, and
 * ld.so says on stderr why when it cannot preload it.
 */
export async function checkLayer(path = layerPath()): Promise<CheckResult> {
  const base = { id: 'layer', title: 'layer' } as const;
  const fix = 'run npm run build';
  if (!existsSync(path)) return { ...base, status: 'fail', detail: `${path} is missing`, fix };
  const env: NodeJS.ProcessEnv = { ...process.env, LD_PRELOAD: path };
  // Outside a session the layer stays passive.
  delete env.MIRRORD_LAYER_SOCKET;
  const result = await run('/bin/cat', ['/proc/self/maps'], env);
  const ldError = result.stderr.split('\n').find((line) => line.includes('ld.so'));
  if (ldError || result.code !== 0 || !result.stdout.includes(path)) {
    const reason =
      ldError?.trim() ?? result.spawnError ?? (firstLine(result.stderr) || 'it is not mapped');
    return { ...base, status: 'fail', detail: `${path} does not preload: ${reason}`, fix };
  }
  const closed = unreadableByOthers(path);
  if (closed) {
    return {
      ...base,
      status: 'warn',
      detail: `${path} preloads, but ${closed}`,
      fix: `apps run as another user cannot preload it: chmod o+rX on ${path} and its directories`,
    };
  }
  return { ...base, status: 'ok', detail: `${path} preloads into a real program` };
}

function apiProblem(error: unknown): string {
  const { name, code, message } = (error ?? {}) as {
    name?: string;
    code?: unknown;
    message?: string;
  };
  if (name === 'AbortError') return `unreachable: no answer within ${API_TIMEOUT_MS / 1000} s`;
  if (typeof code === 'number') return `GET /version answered HTTP ${code}`;
  const text = firstLine(message ?? String(error));
  // node-fetch: "request to URL failed, reason: connect ECONNREFUSED …"
  return `unreachable: ${/reason: (.*)$/.exec(text)?.[1] ?? text}`;
}

export async function checkKubeconfig(options: DoctorOptions = {}): Promise<CheckResult> {
  const base = { id: 'kubeconfig', title: 'kubeconfig' } as const;
  const only = 'only --pod/--deployment/--statefulset need it';
  // Loaded exactly as `mirror --pod` loads it, so what doctor says is what mirror will meet.
  let access: KubeAccess;
  try {
    access = loadKubeAccess({
      kubeconfig: options.kubeconfig,
      context: options.context,
      requestTimeoutMs: API_TIMEOUT_MS,
    });
  } catch (error) {
    if (!(error instanceof KubeError)) throw error;
    return { ...base, status: 'warn', detail: error.message, fix: `${only}: ${KUBECONFIG_FIX}` };
  }
  const where = `context "${access.context}", server ${access.server}`;
  if (access.server.startsWith('http://') && !access.config.getCurrentCluster()?.skipTLSVerify) {
    // client-node refuses such a server before it sends anything.
    return {
      ...base,
      status: 'warn',
      detail: `${where}: client-node talks plain http:// only with insecure-skip-tls-verify`,
      fix: `${only}: use the server's https:// address, or set insecure-skip-tls-verify: true`,
    };
  }
  try {
    const version = await access.version.getCode();
    return { ...base, status: 'ok', detail: `${where}: Kubernetes ${version.gitVersion}` };
  } catch (error) {
    return {
      ...base,
      status: 'warn',
      detail: `${where}: ${apiProblem(error)}`,
      fix: `${only}: check that the cluster is up and reachable from here (kubectl version)`,
    };
  }
}

/**
 * COMMAND as `mirror` would run it: found as `mirror` looks for it, and read to tell whether
 * the layer can hook it (see src/cli/unhookable.ts); the same words as `mirror`'s warning.
 */
export function checkProgram(command: string): CheckResult {
  const base = { id: 'program', title: 'program' } as const;
  const problem = commandProblem(command);
  if (problem !== undefined) {
    return {
      ...base,
      status: 'fail',
      detail: problem,
      fix: 'mirrord mirror refuses this COMMAND too: give the program as a path or a name on PATH',
    };
  }
  // Runnable, so there is a file that execvp runs.
  const { shown, reason } = commandHookability(command)!;
  if (reason !== undefined) {
    return {
      ...base,
      status: 'warn',
      detail: `${shown} is ${reason}: ${UNHOOKABLE_MEANS}`,
      fix: 'mirror into it with --port REMOTE[:LOCAL]; the rest needs a dynamically linked program that is not Go (a C program: link it without -static)',
    };
  }
  return {
    ...base,
    status: 'ok',
    detail: `${shown}: the layer can hook it (not statically linked, not Go)`,
  };
}

/** Runs every check; each one really tries what mirroring needs, none attaches anything. */
export async function runChecks(options: DoctorOptions = {}): Promise<DoctorReport> {
  const checks = await Promise.all([
    checkKernel(),
    checkBpf(),
    checkPrivileges(),
    checkAddon(),
    checkLayer(),
    checkKubeconfig(options),
    ...(options.command === undefined ? [] : [checkProgram(options.command)]),
  ]);
  return { checks, ok: checks.every((check) => check.status !== 'fail') };
}
