/**
 * The test cluster itself (test/cluster/): Services and cluster DNS work as on any cluster
 * (CoreDNS and kube-proxy, which the target-context features are tested on), and a stop leaves
 * nothing on the machine, also after a run that was killed.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { startCluster, stopCluster } from './cluster/cluster.js';
import { checkRoutedLocally } from './cluster/host.js';
import { BRIDGE, NODE_IP, PIDS } from './cluster/layout.js';
import { isAlive } from '../src/platform/local/netns.js';
import { waitFor } from './support/wait.js';
import {
  NODE_IMAGE,
  containerProcesses,
  fixture,
  testCluster,
  type TestCluster,
} from './support/kube.js';

const NAMESPACE = 'cluster';

/** Runs `script` with node in a one-shot pod and returns what it printed. */
async function runInPod(cluster: TestCluster, name: string, script: string): Promise<string> {
  await cluster.core.createNamespacedPod({
    namespace: NAMESPACE,
    body: {
      metadata: { name },
      spec: {
        restartPolicy: 'Never',
        containers: [
          { name, image: NODE_IMAGE, imagePullPolicy: 'Never', command: ['node', '-e', script] },
        ],
      },
    },
  });
  const phase = await waitFor(
    `pod ${name} to end`,
    async () => {
      const { status } = await cluster.core.readNamespacedPod({ name, namespace: NAMESPACE });
      return (status?.phase === 'Succeeded' || status?.phase === 'Failed') && status.phase;
    },
    { ms: 120_000, everyMs: 250 },
  );
  const log = await cluster.core.readNamespacedPodLog({ name, namespace: NAMESPACE });
  if (phase === 'Failed') throw new Error(`pod ${name} failed: ${log}`);
  return log;
}

/** What of the cluster is on this machine now; empty once it is stopped. */
function clusterTraces(): string[] {
  const traces: string[] = [];
  const processes = execFileSync('ps', ['-eo', 'args'], { encoding: 'utf8' })
    .split('\n')
    .filter((line) =>
      /^\S*mirrord-dev\/k8s-|^containerd --config \S*mirrord-dev|-address \S*mirrord-dev\/containerd\.sock/.test(
        line,
      ),
    );
  if (processes.length) traces.push(`processes: ${processes.join('; ')}`);
  if (readFileSync('/proc/self/mountinfo', 'utf8').includes('/mirrord-dev/')) traces.push('mounts');
  if (readdirSync('/sys/class/net').includes(BRIDGE)) traces.push(`bridge ${BRIDGE}`);
  const cgroups = readdirSync('/sys/fs/cgroup').filter((hierarchy) =>
    readdirSync(join('/sys/fs/cgroup', hierarchy)).includes('kubepods'),
  );
  if (cgroups.length) traces.push(`kubepods cgroups in ${cgroups.join(', ')}`);
  if (/-j KUBE-/.test(execFileSync('iptables-save', { encoding: 'utf8' }))) traces.push('iptables');
  if (
    execFileSync('ip', ['address', 'show', 'dev', 'lo'], { encoding: 'utf8' }).includes(NODE_IP)
  ) {
    traces.push(`address ${NODE_IP}`);
  }
  return traces;
}

describe('the test cluster', () => {
  let cluster: TestCluster;

  beforeAll(async () => {
    cluster = await testCluster(NAMESPACE);
  }, 600_000);

  afterAll(async () => {
    await cluster?.remove();
  });

  test('a pod resolves a Service by its cluster DNS name and reaches it through kube-proxy', async () => {
    await cluster.addDeployment('echo', [
      { name: 'echo', command: fixture('http-log-server.mjs', ['8080', '/dev/null']), port: 8080 },
    ]);
    const service = await cluster.core.createNamespacedService({
      namespace: NAMESPACE,
      body: {
        metadata: { name: 'echo' },
        spec: { selector: { app: 'echo' }, ports: [{ port: 80, targetPort: 8080 }] },
      },
    });
    const clusterIp = service.spec!.clusterIP!;
    checkRoutedLocally(clusterIp);
    const body = 'through the Service';
    // The full name and the short one (the pod's search domains); then a request through the
    // cluster IP, which the echo server answers with the sha256 of the body.
    const output = await runInPod(
      cluster,
      'client',
      `const dns = require('dns').promises;
       (async () => {
         const full = await dns.lookup('echo.${NAMESPACE}.svc.cluster.local');
         const short = await dns.lookup('echo');
         const answer = await (await fetch('http://echo.${NAMESPACE}.svc.cluster.local/', {
           method: 'POST', body: '${body}' })).text();
         console.log(JSON.stringify({ full: full.address, short: short.address, answer }));
       })().catch((error) => { console.error(error); process.exit(1); });`,
    );
    expect(JSON.parse(output)).toEqual({
      full: clusterIp,
      short: clusterIp,
      answer: createHash('sha256').update(body).digest('hex'),
    });
  });

  test("stop leaves nothing; a killed cluster's leftovers are removed at the next start", async () => {
    const pod = await cluster.addPod('survivor', [
      { name: 'app', command: fixture('http-log-server.mjs', ['8080', '/dev/null']), port: 8080 },
    ]);
    const containerId = pod.containers[0]!.containerId.replace('containerd://', '');
    const [survivor] = containerProcesses(containerId);
    expect(survivor).toBeDefined();
    // A killed run: every cluster process dies at once, its pods' containers keep running.
    for (const name of readdirSync(PIDS)) {
      process.kill(Number(readFileSync(join(PIDS, name), 'utf8')), 'SIGKILL');
    }
    expect(isAlive(survivor!)).toBe(true);
    await startCluster();
    cluster = await testCluster(NAMESPACE);
    // The old pod's container went with the old cluster's leftovers.
    expect(isAlive(survivor!)).toBe(false);

    stopCluster();
    expect(clusterTraces()).toEqual([]);
    // The files after this one find a running cluster again; this run's teardown stops it.
    await startCluster();
    cluster = await testCluster(NAMESPACE);
  }, 600_000);
});
