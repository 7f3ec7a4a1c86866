/**
 * The app's outgoing connections and name look-ups through a real pod, on the real test
 * cluster: `mirrord mirror --pod app` runs real clients on this machine (redis-cli, node, getent,
 * dig), and what they reach is what the pod reaches. A Redis pod behind a Service `redis`: by the
 * Service's cluster DNS name (CoreDNS, then kube-proxy's DNAT of the ClusterIP), by the short
 * name (the pod's search domains), by the Redis pod's IP; names resolved by getent; dig asking
 * the pod's nameserver (from its resolv.conf) over UDP. Redis itself says where each connection
 * came from (CLIENT INFO): the target pod's address. None of these names resolves on this
 * machine, and the Service range is blackholed here. Afterwards no agent Job, Secret or pod,
 * no agent or resolver process, and no app or CLI process is left.
 */
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { promisify } from 'node:util';
import {
  REDIS_IMAGE,
  agentProcesses,
  containerProcesses,
  requestedJob,
  testCluster,
  type AuditEvent,
  type PodInfo,
  type TestCluster,
} from './support/kube.js';
import {
  killRun,
  mirrord,
  processesMatching,
  untilAsync,
  type MirrorRun,
} from './support/mirror-cli.js';

const run = promisify(execFile);
const NAMESPACE = 'kube-outgoing';
const REDIS_PORT = 6379;
const FQDN = `redis.${NAMESPACE}.svc.cluster.local`;
/** A loaded two-core machine starts containers slowly: generous, as a deadline, not a pause. */
const SLOW = 180_000;

/** An audit event with the user who made the request. */
type Received = AuditEvent & { user?: { username?: string } };

interface AppRun {
  code: number | null;
  /** The app's stdout (the CLI's notes go to stderr). */
  stdout: string;
  /** stdout and stderr, for messages. */
  output: string;
  ms: number;
}

/**
 * The app of the pod-IP test, in Node: RESP by hand to HOST:PORT (SET, GET, CLIENT INFO), and
 * one JSON line of the replies and of the socket's own view of its ends.
 */
const RESP_CLIENT = `
const net = require('net');
const [host, port, value] = process.argv.slice(1);
const bulk = (...words) => \`*\${words.length}\\r\\n\` + words.map((w) => \`$\${Buffer.byteLength(w)}\\r\\n\${w}\\r\\n\`).join('');
const socket = net.connect({ host, port: Number(port) });
let text = '';
socket.on('error', (error) => { console.log(JSON.stringify({ error: error.code })); process.exit(1); });
socket.on('connect', () => socket.write(bulk('SET', 'from-node', value) + bulk('GET', 'from-node') + bulk('CLIENT', 'INFO')));
socket.on('data', (chunk) => {
  text += chunk;
  if (!/laddr=\\S+[^\\r]*\\r\\n$/.test(text)) return;
  console.log(JSON.stringify({ replies: text, local: socket.localAddress, remote: socket.remoteAddress }));
  socket.end();
});
`;

describe('outgoing connections and DNS through a pod (real cluster)', () => {
  let cluster: TestCluster;
  let app: PodInfo;
  let redis: PodInfo;
  let clusterIp: string;
  /** The first nameserver of the target container's /etc/resolv.conf. */
  let nameserver: string;
  /** The target container's processes' pids, as the node sees them (the agent finds them so). */
  let appPids: number[];
  const runs: MirrorRun[] = [];
  const timings: string[] = [];
  /** Where each session's Job requests start in the audit log, until nothingLeft checks them. */
  const sessionsSince: number[] = [];

  /** Runs `command` as the app under `mirrord mirror --pod app`; waits until it ends. */
  async function inPod(command: string[]): Promise<AppRun> {
    const started = Date.now();
    sessionsSince.push(cluster.jobRequests().length);
    const session = mirrord([
      '--kubeconfig',
      cluster.kubeconfig,
      '-n',
      NAMESPACE,
      '--pod',
      app.name,
      '--agent-startup-timeout',
      String(SLOW / 1000),
      '--',
      ...command,
    ]);
    runs.push(session);
    const code = await session.exited;
    const ms = Date.now() - started;
    const label = command[1] === '-e' ? ['node -e RESP_CLIENT', ...command.slice(3)] : command;
    timings.push(`${ms} ms  ${label.join(' ')}`);
    return { code, stdout: session.stdout(), output: session.output(), ms };
  }

  /** The CLI and the app ended well; else fails with what they printed. */
  const succeeded = (result: AppRun): void => {
    if (result.code !== 0) {
      throw new Error(`mirrord exited with code ${result.code}; it printed:\n${result.output}`);
    }
  };

  /** redis-cli on this machine, straight to the Redis pod's IP (routed to the pod bridge). */
  const redisDirect = async (...args: string[]): Promise<string> =>
    (await run('redis-cli', ['-h', redis.ip, '-p', String(REDIS_PORT), ...args])).stdout.trim();

  /** `addr=IP:PORT` of CLIENT INFO's line: where Redis saw the connection come from. */
  const clientAddress = (info: string): string | undefined => /\baddr=([\d.]+):\d+/.exec(info)?.[1];

  /** Runs `command` in the target pod's network namespace (a check of the cluster itself). */
  const inPodNetns = async (command: string, args: string[]): Promise<string> =>
    (await run('nsenter', ['-t', String(appPids[0]), '-n', command, ...args])).stdout.trim();

  beforeAll(async () => {
    cluster = await testCluster(NAMESPACE);
    const service = await cluster.core.createNamespacedService({
      namespace: NAMESPACE,
      body: {
        metadata: { name: 'redis' },
        spec: { selector: { app: 'redis' }, ports: [{ port: REDIS_PORT, name: 'redis' }] },
      },
    });
    clusterIp = service.spec!.clusterIP!;
    [redis, app] = await Promise.all([
      cluster.addPod('redis', [
        {
          name: 'redis',
          image: REDIS_IMAGE,
          command: ['redis-server', '--protected-mode', 'no', '--save', '', '--appendonly', 'no'],
          port: REDIS_PORT,
        },
      ]),
      // The target: a pod that only sleeps. Nothing of the test listens in it.
      cluster.addPod('app', [{ name: 'app', command: ['sleep', 'infinity'] }]),
    ]);
    appPids = containerProcesses(app.containers[0]!.containerId);
    expect(appPids.length).toBeGreaterThan(0);
    // The pod's own resolv.conf, as the kubelet wrote it (dnsPolicy ClusterFirst).
    const resolvConf = readFileSync(`/proc/${appPids[0]}/root/etc/resolv.conf`, 'utf8');
    nameserver = /^nameserver\s+(\S+)/m.exec(resolvConf)![1]!;
    expect(resolvConf).toMatch(new RegExp(`^search ${NAMESPACE}\\.svc\\.cluster\\.local\\b`, 'm'));
    // Until kube-proxy has the Service's rules and CoreDNS its name, from inside the pod.
    await untilAsync(
      async () =>
        (await inPodNetns('redis-cli', ['-h', clusterIp, '-p', String(REDIS_PORT), 'PING'])) ===
          'PONG' &&
        (await inPodNetns('dig', ['+short', '+time=1', '+tries=1', `@${nameserver}`, FQDN])) ===
          clusterIp,
      'the Service redis to answer in the pod, by its ClusterIP and its name',
      60_000,
    );
  }, 600_000);

  afterEach(async () => {
    for (const session of runs.splice(0)) await killRun(session);
  });

  afterAll(async () => {
    // How long each session took (agent Job start included), for the report.
    if (timings.length) console.log(`kube-outgoing sessions:\n${timings.join('\n')}`);
    await cluster?.remove();
  }, SLOW);

  /**
   * Nothing of the sessions is left: the agents' Jobs, Secrets and pods, the agent and its
   * resolver on the node, the CLI and the app here.
   */
  async function nothingLeft(): Promise<void> {
    // Each session's CLI deleted its own Job (not the TTL-after-finished controller, 60 s on).
    for (const since of sessionsSince.splice(0)) {
      const requests = (cluster.jobRequests(since) as Received[]).filter((e) =>
        e.requestURI.includes('/jobs'),
      );
      const create = requests.find((e) => e.verb === 'create');
      expect(create?.responseStatus?.code).toBe(201);
      const name = create!.objectRef?.name ?? requestedJob(create!).metadata?.name;
      const deletes = requests.filter((e) => e.verb === 'delete' && e.objectRef?.name === name);
      expect(deletes.map((e) => [e.user?.username, e.responseStatus?.code])).toEqual([
        [create!.user?.username, 200],
      ]);
    }
    await untilAsync(
      async () => (await cluster.mirrordObjects()).length === 0,
      'no mirrord Job, Secret or pod left',
      60_000,
    ).catch(async (error: Error) => {
      throw new Error(`${error.message}: ${(await cluster.mirrordObjects()).join(', ')}`);
    });
    const ownAgents = agentProcesses().filter((pid) => {
      try {
        return readFileSync(`/proc/${pid}/cmdline`, 'utf8')
          .split('\0')
          .includes(app.containers[0]!.containerId);
      } catch {
        return false;
      }
    });
    expect(ownAgents).toEqual([]);
    expect(
      appPids.flatMap((pid) => processesMatching(`mirrord_resolver --pid ${pid}( |$)`)),
    ).toEqual([]);
    expect(processesMatching(`run\\.js mirror --kubeconfig \\S+ -n ${NAMESPACE} `)).toEqual([]);
    expect(processesMatching(`redis-cli .*${NAMESPACE}|${FQDN}|${redis.ip} ${REDIS_PORT}`)).toEqual(
      [],
    );
  }

  test('redis-cli SET/GET by the Service’s cluster DNS name and by its short name', async () => {
    // This machine knows neither name: only the pod's resolver (CoreDNS, its search domains).
    await expect(run('getent', ['hosts', FQDN])).rejects.toThrow();
    await expect(run('getent', ['hosts', 'redis'])).rejects.toThrow();

    const set = await inPod([
      'redis-cli',
      '-h',
      FQDN,
      '-p',
      String(REDIS_PORT),
      'SET',
      'greeting',
      'set through the pod',
    ]);
    succeeded(set);
    expect(set.stdout.trim()).toBe('OK');
    expect(await redisDirect('GET', 'greeting')).toBe('set through the pod');

    const get = await inPod([
      'redis-cli',
      '-h',
      'redis',
      '-p',
      String(REDIS_PORT),
      'GET',
      'greeting',
    ]);
    succeeded(get);
    expect(get.stdout.trim()).toBe('set through the pod');

    // Redis saw the connection come from the target pod (the ClusterIP DNATed to its pod).
    const info = await inPod(['redis-cli', '-h', FQDN, '-p', String(REDIS_PORT), 'CLIENT', 'INFO']);
    succeeded(info);
    expect(clientAddress(info.stdout)).toBe(app.ip);
    await nothingLeft();
  }, 600_000);

  test('a Node client to the Redis pod’s IP; getent hosts prints the Service’s ClusterIP', async () => {
    const node = await inPod([
      process.execPath,
      '-e',
      RESP_CLIENT,
      redis.ip,
      String(REDIS_PORT),
      'node',
    ]);
    succeeded(node);
    const result = JSON.parse(node.stdout.trim().split('\n').pop()!) as {
      replies: string;
      local: string;
      remote: string;
    };
    expect(result.replies).toMatch(/^\+OK\r\n\$4\r\nnode\r\n\$\d+\r\nid=/);
    // Redis saw the target pod; the app's socket reports the pod's address as its own.
    expect(clientAddress(result.replies)).toBe(app.ip);
    expect({ local: result.local, remote: result.remote }).toEqual({
      local: app.ip,
      remote: redis.ip,
    });
    expect(await redisDirect('GET', 'from-node')).toBe('node');

    const getent = await inPod(['getent', 'hosts', FQDN]);
    succeeded(getent);
    expect(getent.stdout).toMatch(
      new RegExp(`^${clusterIp.replace(/\./g, '\\.')}\\s+${FQDN.replace(/\./g, '\\.')}`, 'm'),
    );
    await nothingLeft();
  }, 600_000);

  test('dig asks the pod’s nameserver over UDP', async () => {
    expect(nameserver).toMatch(/^10\.213\./);
    // From this machine the same question gets nowhere: the Service range is blackholed here.
    await expect(
      run('dig', ['+notcp', '+time=1', '+tries=1', `@${nameserver}`, FQDN, 'A']),
    ).rejects.toThrow();
    const dig = await inPod(['dig', '+notcp', '+time=5', '+tries=1', `@${nameserver}`, FQDN, 'A']);
    succeeded(dig);
    // The whole answer: NOERROR, one A record, from the pod's nameserver over UDP.
    expect(dig.stdout).toMatch(/status: NOERROR/);
    expect(dig.stdout).toMatch(
      new RegExp(
        `^${FQDN.replace(/\./g, '\\.')}\\.\\s+\\d+\\s+IN\\s+A\\s+${clusterIp.replace(/\./g, '\\.')}$`,
        'm',
      ),
    );
    expect(dig.stdout).toContain(`SERVER: ${nameserver}#53(${nameserver}) (UDP)`);
    await nothingLeft();
  }, 600_000);
});
