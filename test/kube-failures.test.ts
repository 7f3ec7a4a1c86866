/**
 * Every failure of `mirrord mirror` on a Kubernetes target the issue lists, with the real CLI
 * against the stand-in cluster: one line that says what is wrong, a non-zero exit, well before
 * any timeout that does not concern it, and nothing left in the cluster.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { startStandInCluster, type StandInCluster } from './kube/cluster.js';
import { CLI, tempDir, until } from './support/mirror-cli.js';

const PORT = 8080;
/** What the CLI prints while it waits; everything else it prints on failure is the error. */
const PROGRESS =
  /^mirrord: (resolving|creating agent Job|pulling image|starting the agent|connecting to the agent)/;
/** Far longer than any failure here may take: a fail-fast case finishing well within it did not wait for it. */
const STARTUP_TIMEOUT_S = 120;

interface Failure {
  code: number | null;
  stdout: string;
  /** stderr without the progress notes. */
  errors: string[];
  progress: string[];
  seconds: number;
}

function start(
  args: string[],
  env: NodeJS.ProcessEnv = process.env,
): { child: ChildProcess; output(): string; done: Promise<Failure> } {
  const began = Date.now();
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const done = new Promise<Failure>((resolve) =>
    child.on('close', (code) => {
      const lines = stderr.split('\n').filter(Boolean);
      resolve({
        code,
        stdout,
        errors: lines.filter((line) => !PROGRESS.test(line)),
        progress: lines.filter((line) => PROGRESS.test(line)),
        seconds: (Date.now() - began) / 1000,
      });
    }),
  );
  return { child, output: () => stderr, done };
}

/** A failed run: exactly one error line, matching `message`, and a non-zero exit. */
function expectOneLine(failure: Failure, message: RegExp): void {
  expect(failure.errors).toHaveLength(1);
  expect(failure.errors[0]).toMatch(/^mirrord: /);
  expect(failure.errors[0]).toMatch(message);
  expect(failure.code).not.toBe(0);
  expect(failure.code).not.toBeNull();
}

describe('mirrord mirror on Kubernetes: failures (stand-in cluster)', () => {
  let cluster: StandInCluster;
  let dir: ReturnType<typeof tempDir>;
  const children: ChildProcess[] = [];
  const servers: net.Server[] = [];

  beforeAll(async () => {
    cluster = await startStandInCluster();
    dir = tempDir('kube-failures');
    await cluster.addPod({
      name: 'api',
      containers: [
        {
          name: 'app',
          image: 'stand-in/local',
          command: [
            process.execPath,
            '-e',
            `require('net').createServer((s) => s.resume()).listen(${PORT})`,
          ],
          ports: [{ containerPort: PORT }],
        },
      ],
    });
  });

  afterEach(async () => {
    for (const child of children.splice(0)) child.kill('SIGKILL');
    for (const server of servers.splice(0)) server.close();
    cluster.faults.clear();
    // Whatever a case did, the stand-in must hold no mirrord Job or pod afterwards.
    await until(() => mirrordObjects().length === 0, 'no mirrord Job or pod', 60_000);
  });

  afterAll(async () => {
    await cluster?.close();
    dir?.remove();
  });

  function mirrordObjects(): string[] {
    return [
      ...cluster.jobs().map((job) => `job/${job.metadata.name}`),
      ...cluster
        .pods()
        .filter((pod) => pod.metadata.labels?.['app.kubernetes.io/managed-by'] === 'mirrord')
        .map((pod) => `pod/${pod.metadata.name}`),
    ];
  }

  /** `mirrord mirror ARGS` against the stand-in, mirroring into --port (no local app needed). */
  function mirror(args: string[], extra: string[] = []) {
    const run = start([
      'mirror',
      '--kubeconfig',
      cluster.kubeconfigPath,
      '--agent-startup-timeout',
      String(STARTUP_TIMEOUT_S),
      ...args,
      '--port',
      String(PORT),
      ...extra,
    ]);
    children.push(run.child);
    return run;
  }

  /** A kubeconfig like the stand-in's, with `edit` applied to its text. */
  function kubeconfigWith(name: string, edit: (text: string) => string): string {
    const path = join(dir.path, name);
    writeFileSync(path, edit(readFileSync(cluster.kubeconfigPath, 'utf8')));
    return path;
  }

  async function listeningServer(onConnection: (socket: net.Socket) => void): Promise<number> {
    const server = net.createServer(onConnection);
    servers.push(server);
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return (server.address() as net.AddressInfo).port;
  }

  test('no kubeconfig: says where it looked', async () => {
    const env: NodeJS.ProcessEnv = { ...process.env, HOME: dir.path };
    delete env.KUBECONFIG;
    const failure = await start(['mirror', '--pod', 'api', '--port', String(PORT)], env).done;
    expectOneLine(
      failure,
      new RegExp(
        `no kubeconfig found \\(looked in ${dir.path}/\\.kube/config\\): give --kubeconfig`,
      ),
    );
    const missing = join(dir.path, 'missing');
    const fromEnv = await start(['mirror', '--pod', 'api', '--port', String(PORT)], {
      ...env,
      KUBECONFIG: `${missing}-a:${missing}-b`,
    }).done;
    expectOneLine(
      fromEnv,
      /no kubeconfig found \(looked in KUBECONFIG \(.*missing-a:.*missing-b\)\)/,
    );
  });

  test('unknown context: lists the known ones', async () => {
    expectOneLine(
      await mirror(['--pod', 'api', '--context', 'prod']).done,
      /context "prod" is not in the kubeconfig \(known: stand-in\)/,
    );
  });

  test('unreachable API server: refused, TLS failure, no answer; each names the server', async () => {
    const closedPort = await listeningServer(() => undefined);
    await new Promise((resolve) => servers.pop()!.close(resolve));
    const refused = kubeconfigWith('refused', (text) =>
      text.replace(cluster.url, `https://127.0.0.1:${closedPort}`),
    );
    expectOneLine(
      await start(['mirror', '--kubeconfig', refused, '--pod', 'api', '--port', String(PORT)]).done,
      new RegExp(
        `cannot reach the Kubernetes API server https://127\\.0\\.0\\.1:${closedPort} \\(context "stand-in"\\): connection refused`,
      ),
    );

    // The server's certificate does not name the host the client expects.
    const wrongName = kubeconfigWith('tls', (text) =>
      text.replace(/(\n\s+)server: /, '$1tls-server-name: not-the-api.example$1server: '),
    );
    expectOneLine(
      await start(['mirror', '--kubeconfig', wrongName, '--pod', 'api', '--port', String(PORT)])
        .done,
      new RegExp(
        `cannot reach the Kubernetes API server ${cluster.url} .*: TLS failed \\(.*not-the-api\\.example`,
      ),
    );

    // Accepts connections and never answers.
    const silentPort = await listeningServer((socket) => socket.on('error', () => undefined));
    const silent = kubeconfigWith('silent', (text) =>
      text.replace(cluster.url, `https://127.0.0.1:${silentPort}`),
    );
    const args = ['--kubeconfig', silent, '--pod', 'api', '--request-timeout', '2', '--port', '80'];
    const timedOut = await start(['mirror', ...args]).done;
    expectOneLine(
      timedOut,
      new RegExp(
        `cannot reach the Kubernetes API server https://127\\.0\\.0\\.1:${silentPort} .*: no answer within 2 s`,
      ),
    );
    // --dry-run needs the target resolved (its node and container ID): the same one line.
    const dryRun = await start(['mirror', ...args.slice(0, -2), '--dry-run']).done;
    expectOneLine(dryRun, /no answer within 2 s/);
    expect(dryRun.stdout).toBe('');
  });

  test('target not found, for each kind', async () => {
    for (const kind of ['pod', 'deployment', 'statefulset']) {
      expectOneLine(
        await mirror([`--${kind}`, 'nope']).done,
        new RegExp(`${kind} "nope" not found in namespace default: check the name and namespace`),
      );
    }
    expectOneLine(
      await mirror(['--pod', 'api', '-n', 'elsewhere']).done,
      /pod "api" not found in namespace elsewhere/,
    );
    expectOneLine(
      await mirror(['--pod', 'api', '--deployment', 'api']).done,
      /give one target, not --pod and --deployment/,
    );
    expectOneLine(
      await mirror(['--pod', 'api', '--container', 'nope']).done,
      /container "nope" not found in pod default\/api \(its containers: app\)/,
    );
  });

  test('target not running: a pending pod, a deployment without a ready pod', async () => {
    cluster.faults.holdContainerCreating(true);
    await cluster.addPod({
      name: 'pending',
      wait: false,
      containers: [{ name: 'app', image: 'stand-in/local', command: ['sleep', '3600'] }],
    });
    await cluster.addDeployment({
      name: 'unready',
      wait: false,
      containers: [{ name: 'app', image: 'stand-in/local', command: ['sleep', '3600'] }],
    });
    await until(
      () => cluster.pods().filter((pod) => pod.status.containerStatuses).length >= 3,
      'the pods to be admitted',
    );
    expectOneLine(
      await mirror(['--pod', 'pending']).done,
      /pod default\/pending is not running \(Pending: ContainerCreating\): mirror a running pod/,
    );
    expectOneLine(
      await mirror(['--deployment', 'unready']).done,
      /deployment default\/unready has no running, ready pod \(pods: unready-\S+ Pending: ContainerCreating\)/,
    );
  });

  test('RBAC denial: names the verb and the resource; what was created is deleted', async () => {
    cluster.faults.deny('create', 'jobs', 'batch');
    const create = await mirror(['--pod', 'api']).done;
    expectOneLine(
      create,
      /not allowed to create jobs\.batch in namespace default \(as stand-in-user\): ask your cluster admin for RBAC permission/,
    );
    cluster.faults.clear();

    cluster.faults.deny('get', 'pods');
    expectOneLine(
      await mirror(['--pod', 'api']).done,
      /not allowed to get pods in namespace default .*: ask your cluster admin for RBAC permission/,
    );
    cluster.faults.clear();

    // Denied only once the Job exists: it must be deleted again.
    cluster.faults.deny('get', 'pods/log');
    const requestsBefore = cluster.requests.length;
    const log = await mirror(['--pod', 'api']).done;
    expectOneLine(
      log,
      /not allowed to get pods\/log in namespace default .*: ask your cluster admin for RBAC permission/,
    );
    expect(log.progress.some((line) => line.includes('creating agent Job'))).toBe(true);
    const deletes = cluster.requests
      .slice(requestsBefore)
      .filter((request) => request.method === 'DELETE');
    expect(deletes.map((request) => request.query.propagationPolicy)).toEqual(['Background']);
  });

  test('RBAC denial of the port-forward: one line, and the Job is deleted', async () => {
    cluster.faults.deny('create', 'pods/portforward');
    const requestsBefore = cluster.requests.length;
    const failure = await mirror(['--pod', 'api']).done;
    expectOneLine(
      failure,
      /not allowed to create pods\/portforward in namespace default \(as stand-in-user\): ask your cluster admin for RBAC permission/,
    );
    expect(failure.progress.some((line) => line.includes('connecting to the agent'))).toBe(true);
    const deletes = cluster.requests
      .slice(requestsBefore)
      .filter((request) => request.method === 'DELETE');
    expect(deletes.map((request) => request.query.propagationPolicy)).toEqual(['Background']);
  });

  test('ImagePullBackOff: names the image and says why, well before the startup timeout', async () => {
    cluster.faults.failImagePull(/mirrord-agent/);
    const failure = await mirror([
      '--pod',
      'api',
      '--agent-image',
      'registry.example/team/mirrord-agent:missing',
    ]).done;
    expectOneLine(
      failure,
      /cannot pull the agent image registry\.example\/team\/mirrord-agent:missing \((ErrImagePull|ImagePullBackOff)\): .*not found; check --agent-image and --agent-pull-secret/,
    );
    expect(failure.seconds).toBeLessThan(STARTUP_TIMEOUT_S / 2);
  });

  test("Unschedulable: the scheduler's message, well before the startup timeout", async () => {
    cluster.faults.unschedulable(true);
    const unschedulable = await mirror(['--pod', 'api']).done;
    expectOneLine(
      unschedulable,
      /the agent cannot be scheduled on the target's node: 0\/1 nodes are available: 1 Insufficient cpu/,
    );
    expect(unschedulable.seconds).toBeLessThan(STARTUP_TIMEOUT_S / 2);
  });

  test("agent exiting early: the agent's own error in the line", async () => {
    const target = await cluster.addPod({
      name: 'restarted',
      containers: [
        {
          name: 'app',
          image: 'stand-in/local',
          command: [process.execPath, '-e', 'setInterval(() => undefined, 1000)'],
        },
      ],
    });
    const [original] = target.containers;
    // The agent pod waits while the target's container is restarted under a new ID: the agent
    // then gets an ID that matches no process any more.
    cluster.faults.holdContainerCreating(true);
    const run = mirror(['--pod', 'restarted']);
    await until(() => run.output().includes('pulling image'), 'the agent pod', 60_000);
    process.kill(original!.pid, 'SIGKILL');
    await until(() => {
      const status = target.object()?.status.containerStatuses?.[0];
      return Boolean(status?.state.running && status.containerID !== original!.containerId);
    }, 'the target container to restart');
    cluster.faults.holdContainerCreating(false);
    const failure = await run.done;
    const id = original!.containerId.replace('containerd://', '');
    expectOneLine(
      failure,
      new RegExp(
        `the agent exited before it was ready \\(exit code \\d+\\): no process of container ${id} found in /proc/\\*/cgroup`,
      ),
    );
    expect(failure.seconds).toBeLessThan(STARTUP_TIMEOUT_S / 2);
  });

  test('startup timeout: says what the agent pod was waiting for', async () => {
    cluster.faults.holdContainerCreating(true);
    const failure = await start([
      'mirror',
      '--kubeconfig',
      cluster.kubeconfigPath,
      '--pod',
      'api',
      '--agent-startup-timeout',
      '3',
      '--port',
      String(PORT),
    ]).done;
    expectOneLine(
      failure,
      /the agent did not start within 3 s \(pod mirrord-agent-[0-9a-f]{8}-\S+: Pending: ContainerCreating\): raise --agent-startup-timeout/,
    );
  });

  test('Ctrl-C while the agent starts: exits 130 and deletes the Job', async () => {
    cluster.faults.holdContainerCreating(true);
    const run = mirror(['--pod', 'api']);
    await until(() => run.output().includes('pulling image'), 'the agent pod', 60_000);
    run.child.kill('SIGINT');
    const failure = await run.done;
    expectOneLine(failure, /interrupted while the agent was starting/);
    expect(failure.code).toBe(130);
  });
});
