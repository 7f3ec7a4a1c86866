/**
 * `mirrord ls` lists what can be mirrored in the stand-in cluster, with containers and ports;
 * `mirrord cleanup` removes the Jobs of sessions that are over and keeps live ones.
 */
import { spawn } from 'node:child_process';
import { startStandInCluster, type StandInCluster } from './kube/cluster.js';
import { CLI, until } from './support/mirror-cli.js';

interface Result {
  code: number | null;
  stdout: string;
  stderr: string;
}

function cli(args: string[]): Promise<Result> {
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  return new Promise((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr })));
}

/** A node process that accepts connections on each port and reads them. */
const server = (...ports: number[]): string[] => [
  process.execPath,
  '-e',
  `for (const port of [${ports.join(',')}]) require('net').createServer((s) => s.resume()).listen(port)`,
];

describe('mirrord ls and mirrord cleanup (stand-in cluster)', () => {
  let cluster: StandInCluster;
  const sessions: ReturnType<typeof spawn>[] = [];

  beforeAll(async () => {
    cluster = await startStandInCluster();
    await cluster.addPod({
      name: 'api',
      containers: [
        {
          name: 'istio-proxy',
          image: 'stand-in/local',
          command: server(15001),
          ports: [{ containerPort: 15001 }],
        },
        {
          name: 'app',
          image: 'stand-in/local',
          command: server(8080, 9090),
          ports: [
            { containerPort: 8080, name: 'http' },
            { containerPort: 9090, name: 'metrics' },
          ],
        },
      ],
    });
    await cluster.addDeployment({
      name: 'web',
      replicas: 2,
      containers: [
        {
          name: 'web',
          image: 'stand-in/local',
          command: server(8081),
          ports: [{ containerPort: 8081, name: 'http' }],
        },
      ],
    });
    await cluster.addStatefulSet({
      name: 'db',
      containers: [
        {
          name: 'db',
          image: 'stand-in/local',
          command: server(6379),
          ports: [{ containerPort: 6379 }],
        },
      ],
    });
  });

  afterEach(() => {
    for (const session of sessions.splice(0)) session.kill('SIGKILL');
  });

  afterAll(async () => {
    await cluster?.close();
  });

  const kube = (...args: string[]) => [...args, '--kubeconfig', cluster.kubeconfigPath];

  /** A session mirroring pod/api into a port, started and ready; its process. */
  async function session(): Promise<ReturnType<typeof spawn>> {
    const child = spawn(
      process.execPath,
      [CLI, 'mirror', ...kube('--pod', 'api', '--agent-ttl', '3600', '--port', '8080', '--json')],
      { stdio: ['ignore', 'pipe', 'ignore'] },
    );
    sessions.push(child);
    let stdout = '';
    child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    await until(() => stdout.includes('"event":"ready"'), 'the session', 90_000);
    return child;
  }

  test('ls lists pods, deployments and statefulsets with their containers and ports', async () => {
    const result = await cli(kube('ls'));
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
    const lines = result.stdout.split('\n');
    expect(lines[0]).toMatch(/^TARGET\s+NAMESPACE\s+READY\s+CONTAINERS \(PORTS\)$/);
    const row = (target: string) => lines.find((line) => line.startsWith(`${target} `));
    expect(row('deployment/web')).toMatch(
      /^deployment\/web\s+default\s+2\/2\s+web \(8081\/http\)$/,
    );
    expect(row('statefulset/db')).toMatch(/^statefulset\/db\s+default\s+1\/1\s+db \(6379\)$/);
    expect(row('pod/api')).toMatch(
      /^pod\/api\s+default\s+2\/2\s+istio-proxy \(15001\) \[mesh sidecar\], app \(8080\/http, 9090\/metrics\)$/,
    );
    expect(row('pod/db-0')).toMatch(/^pod\/db-0\s+default\s+1\/1\s+db \(6379\)$/);
    expect(
      lines.filter((line) => /^pod\/web-\S+\s+default\s+1\/1\s+web \(8081\/http\)$/.test(line)),
    ).toHaveLength(2);
    expect(result.stdout).toMatch(/mirror one: mirrord mirror --deployment web -- COMMAND/);

    const everywhere = await cli(kube('ls', '--all-namespaces'));
    expect(everywhere.code).toBe(0);
    const rows = (text: string) => text.split('\n').filter((line) => /^\S+\s+default\s/.test(line));
    expect(rows(everywhere.stdout)).toEqual(rows(result.stdout));
    expect(everywhere.stdout).toMatch(
      /mirror one: mirrord mirror --deployment web -n default -- COMMAND/,
    );

    const elsewhere = await cli(kube('ls', '-n', 'elsewhere'));
    expect(elsewhere.code).toBe(0);
    expect(elsewhere.stdout.trim()).toBe('no targets in namespace elsewhere');
  });

  test('ls --json: the same, for machines', async () => {
    const result = await cli(kube('ls', '--json'));
    expect(result.code).toBe(0);
    const { targets } = JSON.parse(result.stdout) as {
      targets: { target: string; [key: string]: unknown }[];
    };
    expect(targets.map((t) => t.target).filter((t) => !t.startsWith('pod/web-'))).toEqual([
      'deployment/web',
      'statefulset/db',
      'pod/api',
      'pod/db-0',
    ]);
    expect(targets.find((t) => t.target === 'pod/api')).toEqual({
      target: 'pod/api',
      kind: 'pod',
      name: 'api',
      namespace: 'default',
      ready: '2/2',
      mirrorable: true,
      containers: [
        {
          name: 'istio-proxy',
          ports: [{ port: 15001, protocol: 'TCP' }],
          sidecar: true,
          default: false,
        },
        {
          name: 'app',
          ports: [
            { port: 8080, name: 'http', protocol: 'TCP' },
            { port: 9090, name: 'metrics', protocol: 'TCP' },
          ],
          sidecar: false,
          default: true,
        },
      ],
    });
    expect(targets.find((t) => t.target === 'deployment/web')).toMatchObject({
      kind: 'deployment',
      ready: '2/2',
      mirrorable: true,
      containers: [{ name: 'web', ports: [{ port: 8081, name: 'http', protocol: 'TCP' }] }],
    });
  });

  test('cleanup keeps a live session, removes the Job a killed CLI left, and --all removes any', async () => {
    const live = await session();
    const job = () => cluster.jobs().map((j) => j.metadata.name ?? '');
    expect(job()).toHaveLength(1);
    const [name] = job();

    // mirrord's own agent pod is not a target.
    const listed = await cli(kube('ls', '--json'));
    expect(listed.stdout).not.toContain('mirrord-agent');

    const kept = await cli(kube('cleanup'));
    expect(kept.code).toBe(0);
    expect(kept.stdout).toBe(
      `nothing to remove in namespace default\nkept job default/${name}: its CLI (pid ${live.pid}) is still running\n`,
    );
    expect(job()).toEqual([name]);

    // A crashed session: its Job stays (TTL 3600 s) until cleanup removes it.
    live.kill('SIGKILL');
    await until(() => live.exitCode !== null || live.signalCode !== null, 'the CLI to die');
    expect(job()).toEqual([name]);
    const removed = await cli(kube('cleanup', '--json'));
    expect(removed.code).toBe(0);
    const result = JSON.parse(removed.stdout) as {
      removed: { kind: string; name: string; reason: string }[];
      kept: unknown[];
    };
    expect(result.kept).toEqual([]);
    expect(result.removed).toHaveLength(1);
    expect(result.removed[0]).toMatchObject({ kind: 'job', name });
    expect(result.removed[0]!.reason).toMatch(
      /^(its agent finished \((Complete|Failed)\)|its CLI \(pid \d+ on this host\) is gone)$/,
    );
    await until(
      () =>
        cluster.jobs().length === 0 &&
        !cluster.pods().some((p) => p.metadata.labels?.['app.kubernetes.io/managed-by']),
      'the Job and its pod to go',
      60_000,
    );

    // --all: also a session that may still be running.
    await session();
    const [other] = job();
    const all = await cli(kube('cleanup', '--all', '--all-namespaces'));
    expect(all.code).toBe(0);
    expect(all.stdout).toBe(`removed job default/${other}: removed with --all\n`);
    await until(() => cluster.jobs().length === 0, 'the Job to go', 60_000);
  });
});
