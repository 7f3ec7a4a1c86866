import { execFileSync, spawn } from 'node:child_process';
import {
  existsSync,
  mkdirSync,
  openSync,
  readFileSync,
  readdirSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { get as httpGet } from 'node:http';
import { get as httpsGet } from 'node:https';
import { dirname, join } from 'node:path';
import { packageRoot } from '../../src/package-root.js';
import { installAddons, waitUntilReady } from './addons.js';
import {
  apiServer,
  containerd,
  controllerManager,
  etcd,
  kubelet,
  kubeProxy,
  scheduler,
  type Component,
} from './components.js';
import { setUpHost } from './host.js';
import { waitFor } from '../support/wait.js';
import {
  BRIDGE,
  CONTAINERD_SOCKET,
  CONTAINERD_STATE,
  KUBELET_ROOT,
  LOGS,
  NODE_IP,
  OWNER_FILE,
  PIDS,
  RUN,
} from './layout.js';
import { CA_CERT, IDENTITIES, certPath, createPki, keyPath, kubeconfigPath } from './pki.js';

/**
 * The test cluster's life: builds what is missing (build.sh, images.sh), starts etcd, the
 * control plane, containerd, the kubelet, kube-proxy and CoreDNS as processes of this machine,
 * and stops them again (stop.sh), removing what they left. One cluster at a time; its owner
 * file says which process started it, so tests reuse a running one, and the next start after a
 * killed run clears its leftovers first.
 */

/** build.sh and images.sh, in the source tree (this module also runs compiled, from .test-out). */
const SCRIPTS = join(packageRoot(), 'test', 'cluster');

export const ADMIN_KUBECONFIG = kubeconfigPath(IDENTITIES.admin);

const started = Date.now();
function progress(message: string): void {
  process.stderr.write(
    `cluster: ${message} (${Math.round((Date.now() - started) / 1000)} s so far)\n`,
  );
}

/** The process that started the running cluster, if one runs. */
function owner(): number | undefined {
  try {
    return Number(readFileSync(OWNER_FILE, 'utf8'));
  } catch {
    return undefined;
  }
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Runs one of the build scripts with its progress on our stderr; its stdout's last line. */
function script(name: string, args: string[] = []): string {
  const out = execFileSync('bash', [join(SCRIPTS, name), ...args], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  return out.trim().split('\n').at(-1) ?? '';
}

function logTail(name: string): string {
  try {
    return readFileSync(join(LOGS, `${name}.log`), 'utf8')
      .trim()
      .split('\n')
      .slice(-8)
      .join('\n');
  } catch {
    return '(no log)';
  }
}

/** One GET; resolves with the status code, or 0 when nothing answered. */
function probe(url: string): Promise<number> {
  return new Promise((resolve) => {
    const done = (response: { statusCode?: number; resume(): void }): void => {
      response.resume();
      resolve(response.statusCode ?? 0);
    };
    const request = url.startsWith('https:')
      ? httpsGet(
          url,
          {
            // The API server's own CA, and the admin's certificate (readyz needs a user).
            ca: readFileSync(CA_CERT),
            cert: readFileSync(certPath(IDENTITIES.admin)),
            key: readFileSync(keyPath(IDENTITIES.admin)),
            // The scheduler's and controller manager's serving certificates are self-signed.
            rejectUnauthorized: url.includes(':6443/'),
            timeout: 2_000,
          },
          done,
        )
      : httpGet(url, { timeout: 2_000 }, done);
    request.on('error', () => resolve(0));
    request.on('timeout', () => request.destroy());
  });
}

function startProcess(component: Component, pids: Record<string, number>): number {
  for (const [path, content] of Object.entries(component.files ?? {})) {
    mkdirSync(dirname(path), { recursive: true });
    writeFileSync(path, content);
  }
  const log = openSync(join(LOGS, `${component.name}.log`), 'a');
  // Detached: the cluster outlives a test file, and Ctrl-C in a terminal reaches only us.
  const child = spawn(component.command, component.args, {
    detached: true,
    stdio: ['ignore', log, log],
  });
  child.unref();
  if (!child.pid) throw new Error(`${component.name} did not start (${component.command})`);
  pids[component.name] = child.pid;
  writeFileSync(join(PIDS, component.name), String(child.pid));
  return child.pid;
}

async function start(
  component: Component,
  pids: Record<string, number>,
  timeoutMs = 60_000,
): Promise<void> {
  progress(`starting ${component.name}`);
  const pid = startProcess(component, pids);
  const alive = (): void => {
    if (!isAlive(pid))
      throw new Error(`${component.name} exited at start:\n${logTail(component.name)}`);
  };
  const health = component.health;
  if (health)
    await waitFor(
      component.name,
      async () => {
        alive();
        return (await probe(health)) === 200;
      },
      { ms: timeoutMs, everyMs: 200 },
    );
}

/**
 * Stops the cluster (whoever started it, alive or not) and removes what it left: see stop.sh,
 * which jest's teardown also runs.
 */
export function stopCluster(): void {
  execFileSync('bash', [join(SCRIPTS, 'stop.sh')], { stdio: ['ignore', 'inherit', 'inherit'] });
}

function binDirectory(): string {
  return script('build.sh');
}

/** What stop.sh removes, for it to read without this module. */
function writeLayout(bin: string): void {
  const layout = { BIN: bin, BRIDGE, CONTAINERD_SOCKET, CONTAINERD_STATE, KUBELET_ROOT, NODE_IP };
  writeFileSync(
    join(RUN, 'layout.env'),
    Object.entries(layout)
      .map(([key, value]) => `${key}=${value}\n`)
      .join(''),
  );
  writeFileSync(OWNER_FILE, String(process.pid));
}

/**
 * Starts the cluster, owned by this process: builds what is missing (this takes many minutes
 * the first time), clears a previous run's leftovers, and resolves once the node is Ready,
 * CoreDNS answers and the `default` ServiceAccount exists.
 */
export async function startCluster(): Promise<string> {
  if (process.getuid?.() !== 0)
    throw new Error('the test cluster needs root (containers, cgroups, iptables)');
  progress('building what is missing');
  const bin = binDirectory();
  if (owner()) progress('stopping the cluster of an earlier run');
  stopCluster();
  rmSync(RUN, { recursive: true, force: true });
  mkdirSync(LOGS, { recursive: true });
  mkdirSync(PIDS, { recursive: true });
  const pids: Record<string, number> = {};
  try {
    writeLayout(bin);
    createPki();
    setUpHost();
    await start(containerd(), pids);
    await waitFor('containerd', async () => existsSync(CONTAINERD_SOCKET) && ctrAnswers(), {
      ms: 30_000,
      everyMs: 200,
    });
    progress('importing images');
    script('images.sh', ['--address', CONTAINERD_SOCKET, '--coredns-bin', join(bin, 'coredns')]);
    await start(etcd(bin), pids);
    await start(apiServer(bin), pids, 120_000);
    await start(controllerManager(bin), pids);
    await start(scheduler(bin), pids);
    await start(kubelet(bin), pids);
    await start(kubeProxy(bin), pids);
    progress('installing CoreDNS');
    await installAddons(ADMIN_KUBECONFIG);
    progress('waiting for the node, CoreDNS and the default ServiceAccount');
    await waitUntilReady(ADMIN_KUBECONFIG, () => {
      for (const [name, pid] of Object.entries(pids)) {
        if (!isAlive(pid)) throw new Error(`${name} exited:\n${logTail(name)}`);
      }
    });
  } catch (error) {
    progress(`start failed; stopping what was started (logs in ${LOGS})`);
    stopCluster();
    throw error;
  }
  progress('ready');
  return ADMIN_KUBECONFIG;
}

function ctrAnswers(): boolean {
  try {
    execFileSync('ctr', ['--address', CONTAINERD_SOCKET, 'version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/**
 * Calls `onExit` with the name and log tail of the first cluster process that exits (checked
 * every 2 s): a cluster that breaks while a developer uses it says so. Also keeps this process
 * alive until then.
 */
export function watchCluster(onExit: (message: string) => void): void {
  const timer = setInterval(() => {
    for (const name of readdirSync(PIDS)) {
      if (!isAlive(Number(readFileSync(join(PIDS, name), 'utf8')))) {
        clearInterval(timer);
        onExit(`${name} exited:\n${logTail(name)}`);
        return;
      }
    }
  }, 2_000);
}

/**
 * For tests: the running cluster if there is a healthy one (started by this test run, or by a
 * developer's `npm run dev:cluster`), else a new one owned by this process, which the test
 * run's global teardown stops.
 */
export async function ensureCluster(): Promise<string> {
  const started = owner();
  if (!started || !isAlive(started) || !existsSync(PIDS) || readdirSync(PIDS).length === 0) {
    return startCluster();
  }
  // Someone's cluster runs: never stop it here. A busy machine may answer slowly, so wait.
  await waitFor(
    "the running cluster's API server",
    async () => (await probe(apiServer('').health!)) === 200,
    { ms: 120_000, everyMs: 200 },
  );
  return ADMIN_KUBECONFIG;
}
