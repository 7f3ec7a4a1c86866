/**
 * `mirrord ls` lists what can be mirrored in a namespace of the real test cluster (pods,
 * deployments, statefulsets, with containers and ports as the API server stores them), and
 * `mirrord cleanup` removes the Jobs of sessions that are over and keeps live ones. Everything
 * runs in this file's namespace: other test files run sessions in theirs at the same time, so
 * cleanup is never given --all-namespaces here.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { agentProcesses, testCluster, type PodInfo, type TestCluster } from './support/kube.js';
import {
  CLI,
  killRun,
  mirrord,
  until,
  untilAsync,
  untilWhileRunning,
  type MirrorRun,
} from './support/mirror-cli.js';

const NAMESPACE = 'kube-ls';

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

/** A node program that accepts connections on each port and reads them. */
const server = (...ports: number[]): string[] => [
  'node',
  '-e',
  `for (const port of [${ports.join(',')}]) require('net').createServer((s) => s.resume()).listen(port)`,
];

/** A table row's cells (columns are two or more spaces apart; padding depends on all rows). */
const cells = (line: string): string[] => line.trim().split(/\s{2,}/);

describe('mirrord ls and mirrord cleanup (real cluster)', () => {
  let cluster: TestCluster;
  /** The app container of pod/api, which the sessions mirror. */
  let app: string;
  const sessions: MirrorRun[] = [];

  beforeAll(async () => {
    cluster = await testCluster(NAMESPACE);
    // Made directly rather than with addPod: a container with two named ports, and a sidecar
    // with an unnamed one, as `ls` shows both forms.
    await cluster.core.createNamespacedPod({
      namespace: NAMESPACE,
      body: {
        metadata: { name: 'api', labels: { app: 'api' } },
        spec: {
          terminationGracePeriodSeconds: 1,
          containers: [
            {
              name: 'istio-proxy',
              image: 'mirrord.test/node:20',
              imagePullPolicy: 'Never',
              command: server(15001),
              ports: [{ containerPort: 15001 }],
            },
            {
              name: 'app',
              image: 'mirrord.test/node:20',
              imagePullPolicy: 'Never',
              command: server(8080, 9090),
              ports: [
                { containerPort: 8080, name: 'http' },
                { containerPort: 9090, name: 'metrics' },
              ],
              readinessProbe: { tcpSocket: { port: 8080 }, periodSeconds: 1 },
            },
          ],
        },
      },
    });
    const workloads: Promise<PodInfo[]>[] = [
      cluster.addDeployment('web', [{ name: 'web', command: server(8081), port: 8081 }], 2),
      cluster.addStatefulSet('db', [{ name: 'db', command: server(6379), port: 6379 }]),
    ];
    await Promise.all(workloads);
    await untilAsync(
      async () => {
        const pod = await cluster.core.readNamespacedPod({ name: 'api', namespace: NAMESPACE });
        const status = pod.status?.containerStatuses ?? [];
        app = status.find((container) => container.name === 'app')?.containerID ?? '';
        return status.length === 2 && status.every((container) => container.ready);
      },
      'pod/api to be ready',
      120_000,
    );
    // The workloads' own status (what `ls` shows as READY) follows their pods' readiness a
    // little later: the controllers write it.
    await untilAsync(
      async () => {
        const web = await cluster.apps.readNamespacedDeployment({
          name: 'web',
          namespace: NAMESPACE,
        });
        const db = await cluster.apps.readNamespacedStatefulSet({
          name: 'db',
          namespace: NAMESPACE,
        });
        return web.status?.readyReplicas === 2 && db.status?.readyReplicas === 1;
      },
      'the workloads to count their ready replicas',
      120_000,
    );
  }, 600_000);

  afterEach(async () => {
    for (const session of sessions.splice(0)) await killRun(session);
  });

  afterAll(async () => {
    await cluster?.remove();
  }, 300_000);

  const kube = (...args: string[]) => [...args, '--kubeconfig', cluster.kubeconfig];

  /** mirrord's Jobs in the namespace, by name. */
  const jobs = async (): Promise<string[]> =>
    (await cluster.mirrordObjects())
      .filter((object) => object.startsWith('job/'))
      .map((object) => object.slice('job/'.length));

  /** Agents on this machine that tap pod/api's app container. */
  const agentsOfApp = (): number[] =>
    agentProcesses().filter((pid) => {
      try {
        return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').includes(app);
      } catch {
        return false;
      }
    });

  /** A session mirroring pod/api into a port, started and ready. */
  async function session(): Promise<MirrorRun> {
    const run = mirrord(
      kube('--pod', 'api', '-n', NAMESPACE, '--agent-ttl', '3600', '--port', '8080', '--json'),
    );
    sessions.push(run);
    await untilWhileRunning(
      run,
      () => run.events().some((event) => event.event === 'ready'),
      'the session to be ready',
      240_000,
    );
    return run;
  }

  test('ls lists pods, deployments and statefulsets with their containers and ports', async () => {
    const result = await cli(kube('ls', '-n', NAMESPACE));
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
    const lines = result.stdout.split('\n');
    expect(cells(lines[0]!)).toEqual(['TARGET', 'NAMESPACE', 'READY', 'CONTAINERS (PORTS)']);
    const table = lines.slice(1, lines.indexOf('')).map(cells);
    // Deployments, statefulsets, then pods, each by name; the ports' names as the pod specs
    // give them (support/kube.ts names a target's port pPORT).
    expect(table.map(([target]) => target!.replace(/^pod\/web-\S+$/, 'pod/web-*'))).toEqual([
      'deployment/web',
      'statefulset/db',
      'pod/api',
      'pod/db-0',
      'pod/web-*',
      'pod/web-*',
    ]);
    const row = (target: string) => table.find(([name]) => name === target);
    expect(row('deployment/web')).toEqual(['deployment/web', NAMESPACE, '2/2', 'web (8081/p8081)']);
    expect(row('statefulset/db')).toEqual(['statefulset/db', NAMESPACE, '1/1', 'db (6379/p6379)']);
    expect(row('pod/api')).toEqual([
      'pod/api',
      NAMESPACE,
      '2/2',
      'istio-proxy (15001) [mesh sidecar], app (8080/http, 9090/metrics)',
    ]);
    expect(row('pod/db-0')).toEqual(['pod/db-0', NAMESPACE, '1/1', 'db (6379/p6379)']);
    expect(
      table.filter(([target]) => target!.startsWith('pod/web-')).map((r) => r.slice(1)),
    ).toEqual([
      [NAMESPACE, '1/1', 'web (8081/p8081)'],
      [NAMESPACE, '1/1', 'web (8081/p8081)'],
    ]);
    expect(result.stdout).toMatch(
      new RegExp(`\nmirror one: mirrord mirror --deployment web -n ${NAMESPACE} -- COMMAND\n$`),
    );

    // Every namespace: the same rows for this one (other test files' namespaces come and go
    // meanwhile), and the cluster's own CoreDNS.
    const everywhere = await cli(kube('ls', '--all-namespaces'));
    expect(everywhere.stderr).toBe('');
    expect(everywhere.code).toBe(0);
    const rows = (text: string) =>
      text
        .split('\n')
        .map(cells)
        .filter((cellsOfRow) => cellsOfRow[1] === NAMESPACE);
    expect(rows(everywhere.stdout)).toEqual(rows(result.stdout));
    expect(rows(everywhere.stdout)).toHaveLength(6);
    expect(everywhere.stdout.split('\n').map(cells)).toContainEqual([
      'deployment/coredns',
      'kube-system',
      '1/1',
      'coredns (53/dns, 53/dns-tcp, 9153/metrics)',
    ]);
    expect(everywhere.stdout).toMatch(
      /\nmirror one: mirrord mirror --\w+ \S+ -n \S+ -- COMMAND\n$/,
    );

    const elsewhere = await cli(kube('ls', '-n', `${NAMESPACE}-none`));
    expect(elsewhere.stderr).toBe('');
    expect(elsewhere.code).toBe(0);
    expect(elsewhere.stdout).toBe(`no targets in namespace ${NAMESPACE}-none\n`);
  });

  test('ls --json: the same, for machines', async () => {
    const result = await cli(kube('ls', '-n', NAMESPACE, '--json'));
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
    const { targets } = JSON.parse(result.stdout) as {
      targets: { target: string; [key: string]: unknown }[];
    };
    expect(targets.map((t) => t.target.replace(/^pod\/web-\S+$/, 'pod/web-*'))).toEqual([
      'deployment/web',
      'statefulset/db',
      'pod/api',
      'pod/db-0',
      'pod/web-*',
      'pod/web-*',
    ]);
    // The API server defaults each port's protocol to TCP.
    expect(targets.find((t) => t.target === 'pod/api')).toEqual({
      target: 'pod/api',
      kind: 'pod',
      name: 'api',
      namespace: NAMESPACE,
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
    expect(targets.find((t) => t.target === 'deployment/web')).toEqual({
      target: 'deployment/web',
      kind: 'deployment',
      name: 'web',
      namespace: NAMESPACE,
      ready: '2/2',
      mirrorable: true,
      containers: [
        {
          name: 'web',
          ports: [{ port: 8081, name: 'p8081', protocol: 'TCP' }],
          sidecar: false,
          default: true,
        },
      ],
    });
    expect(targets.find((t) => t.target === 'statefulset/db')).toMatchObject({
      kind: 'statefulset',
      ready: '1/1',
      mirrorable: true,
      containers: [{ name: 'db', ports: [{ port: 6379, name: 'p6379', protocol: 'TCP' }] }],
    });
  });

  test('cleanup keeps a live session, removes the Job a killed CLI left, and --all removes any', async () => {
    const live = await session();
    expect(await jobs()).toHaveLength(1);
    const [name] = await jobs();
    expect(agentsOfApp()).toHaveLength(1);

    // mirrord's own agent pod is not a target.
    const listed = await cli(kube('ls', '-n', NAMESPACE, '--json'));
    expect(listed.code).toBe(0);
    expect(listed.stdout).toContain('"pod/api"');
    expect(listed.stdout).not.toContain('mirrord-agent');

    const kept = await cli(kube('cleanup', '-n', NAMESPACE));
    expect(kept.stderr).toBe('');
    expect(kept.code).toBe(0);
    expect(kept.stdout).toBe(
      `nothing to remove in namespace ${NAMESPACE}\n` +
        `kept job ${NAMESPACE}/${name}: its CLI (pid ${live.child.pid}) is still running\n`,
    );
    expect(await jobs()).toEqual([name]);

    // A crashed session: its Job stays (TTL 3600 s) until cleanup removes it. Its agent may
    // have finished meanwhile (its session's connection closed), or still be waiting.
    live.child.kill('SIGKILL');
    await live.exited;
    expect(await jobs()).toEqual([name]);
    const removed = await cli(kube('cleanup', '-n', NAMESPACE, '--json'));
    expect(removed.stderr).toBe('');
    expect(removed.code).toBe(0);
    const result = JSON.parse(removed.stdout) as {
      removed: { kind: string; name: string; reason: string }[];
      kept: unknown[];
    };
    expect(result.kept).toEqual([]);
    expect(result.removed).toHaveLength(1);
    expect(result.removed[0]).toMatchObject({ kind: 'job', namespace: NAMESPACE, name });
    expect(result.removed[0]!.reason).toMatch(
      /^(its agent finished \((Complete|Failed)\)|its CLI \(pid \d+ on this host\) is gone)$/,
    );
    // The Job's pod goes with it (propagation Background), and with it the agent.
    await untilAsync(
      async () => {
        return (await cluster.mirrordObjects()).length === 0;
      },
      'the Job and its pod to go',
      120_000,
    );
    await until(() => agentsOfApp().length === 0, 'the agent to exit', 60_000);

    // --all: also a session that is still running.
    await session();
    const [other] = await jobs();
    expect(other).not.toBe(name);
    const all = await cli(kube('cleanup', '--all', '-n', NAMESPACE));
    expect(all.stderr).toBe('');
    expect(all.code).toBe(0);
    expect(all.stdout).toBe(`removed job ${NAMESPACE}/${other}: removed with --all\n`);
    await untilAsync(
      async () => {
        return (await cluster.mirrordObjects()).length === 0;
      },
      'the Job and its pod to go',
      120_000,
    );
    await until(() => agentsOfApp().length === 0, 'the agent to exit', 60_000);
  }, 900_000);
});
