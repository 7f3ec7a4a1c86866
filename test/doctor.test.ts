/**
 * `mirrord doctor`, as a user runs it: the real CLI, as root and as an unprivileged user, against
 * kubeconfigs whose API server is missing, silent, or the real test cluster's.
 */
import { KubeConfig, VersionApi } from '@kubernetes/client-node';
import {
  chmodSync,
  copyFileSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { type Server as HttpServer } from 'node:http';
import { createServer as createTcpServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { checkAddon, checkKernel, checkLayer, checkPrivileges } from '../src/doctor/checks.js';
import { ensureCluster } from './cluster/cluster.js';
import { packageRoot } from '../src/package-root.js';
import { runToEnd, type Run } from './support/processes.js';

const CLI = join(dirname(fileURLToPath(import.meta.url)), '..', 'bin', 'run.js');
const LOCAL_CHECKS = ['kernel', 'bpf', 'privileges', 'addon', 'layer'];
const MARKS: Record<string, string> = { ok: 'ok', warn: 'warn', fail: 'FAIL' };

/** The parts of a kubeconfig (as the test cluster writes it, in JSON) this test edits. */
interface KubeconfigFile {
  clusters: { name: string; cluster: { server: string } }[];
  contexts: { name: string; context: { cluster: string; user: string } }[];
}

interface Check {
  id: string;
  title: string;
  status: 'ok' | 'warn' | 'fail';
  detail: string;
  fix?: string;
}

interface HumanLine {
  mark: string;
  title: string;
  detail: string;
  fix?: string;
}

let dir: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'mirrord-doctor-'));
});

afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

/** `nobody` drops every capability, as a user who forgot sudo would run it. */
function runDoctor(args: string[], env: NodeJS.ProcessEnv, asNobody = false): Promise<Run> {
  const command = [process.execPath, CLI, 'doctor', ...args];
  const [file, ...argv] = asNobody
    ? ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups', '--inh-caps=-all', ...command]
    : command;
  return runToEnd(file!, argv, { ...process.env, ...env });
}

/** Each check is `MARK  TITLE  DETAIL`, its fix (if any) on the next line, indented. */
function parseHuman(stdout: string): HumanLine[] {
  const lines: HumanLine[] = [];
  for (const line of stdout.split('\n').filter(Boolean)) {
    const check = /^(ok|warn|FAIL) +(.+?) {2,}(.+)$/.exec(line);
    const fix = /^ +fix: (.+)$/.exec(line);
    if (check) lines.push({ mark: check[1]!, title: check[2]!, detail: check[3]! });
    else if (fix && lines.length) lines[lines.length - 1]!.fix = fix[1];
    else throw new Error(`unexpected line in doctor's output: ${line}`);
  }
  return lines;
}

/** Runs doctor twice, plain and --json, and checks that both tell the same. */
async function doctor(args: string[], env: NodeJS.ProcessEnv, asNobody = false) {
  const human = await runDoctor(args, env, asNobody);
  const json = await runDoctor([...args, '--json'], env, asNobody);
  expect(human.stderr).toBe('');
  expect(json.stderr).toBe('');
  const report = JSON.parse(json.stdout) as { checks: Check[]; ok: boolean };
  const lines = parseHuman(human.stdout);
  expect(lines.map((line) => [line.mark, line.title])).toEqual(
    report.checks.map((check) => [MARKS[check.status], check.title]),
  );
  for (const [i, check] of report.checks.entries()) {
    expect(Boolean(lines[i]!.fix)).toBe(check.status !== 'ok');
  }
  expect(json.code).toBe(human.code);
  expect(report.ok).toBe(human.code === 0);
  const byId = new Map(report.checks.map((check) => [check.id, check]));
  return { code: human.code, byId, statusOf: (id: string) => byId.get(id)?.status };
}

function kubeconfig(
  name: string,
  clusters: Record<string, string>,
  current: string,
  skipTlsVerify = true,
): string {
  const path = join(dir, name);
  const names = Object.keys(clusters);
  writeFileSync(
    path,
    [
      'apiVersion: v1',
      'kind: Config',
      'clusters:',
      ...names.flatMap((n) => [
        `- name: ${n}`,
        '  cluster:',
        `    server: ${clusters[n]}`,
        `    insecure-skip-tls-verify: ${skipTlsVerify}`,
      ]),
      'contexts:',
      ...names.flatMap((n) => [`- name: ${n}`, `  context: {cluster: ${n}, user: dev}`]),
      `current-context: ${current}`,
      'users:',
      '- name: dev',
      '  user: {token: doctor-test}',
      '',
    ].join('\n'),
  );
  return path;
}

function listen<T extends Server | HttpServer>(server: T): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      resolve(typeof address === 'object' && address ? address.port : 0);
    });
  });
}

function close(server: Server | HttpServer): Promise<void> {
  return new Promise((resolve) => server.close(() => resolve()));
}

/** A loopback port where nothing listens: taken from the kernel, then given back. */
async function deadPort(): Promise<number> {
  const server = createTcpServer();
  const port = await listen(server);
  await close(server);
  return port;
}

describe('mirrord doctor', () => {
  test('as root everything local is ok; no kubeconfig is a warning only, exit 0', async () => {
    const absent = join(dir, 'absent-kubeconfig');
    const { code, byId, statusOf } = await doctor([], { KUBECONFIG: absent });
    for (const id of LOCAL_CHECKS) expect([id, statusOf(id)]).toEqual([id, 'ok']);
    expect(byId.get('kernel')!.detail).toMatch(/TCX links|legacy tc filter/);
    expect(byId.get('bpf')!.detail).toMatch(/ring buffer map yes, TC \(sched_cls\) program yes/);
    expect(statusOf('kubeconfig')).toBe('warn');
    expect(byId.get('kubeconfig')!.detail).toMatch(
      `no kubeconfig found (looked in KUBECONFIG (${absent}))`,
    );
    expect(code).toBe(0);
  });

  test('an unprivileged user: privileges fail naming what is missing, exit 1', async () => {
    // nobody's HOME stays root's without this, and oclif would try to read its data there.
    const env = { KUBECONFIG: join(dir, 'absent-kubeconfig'), HOME: '/nonexistent' };
    const { code, byId, statusOf } = await doctor([], env, true);
    const privileges = byId.get('privileges')!;
    expect(privileges.status).toBe('fail');
    for (const cap of ['CAP_BPF', 'CAP_NET_ADMIN', 'CAP_SYS_ADMIN', 'CAP_SYS_PTRACE']) {
      expect(privileges.detail).toContain(cap);
    }
    expect(privileges.fix).toMatch(/sudo/);
    // bpftool's probe runs as nobody too, and really cannot create the map or load the program.
    expect(statusOf('bpf')).toBe('fail');
    expect(byId.get('bpf')!.detail).toMatch(/ring buffer map no, TC \(sched_cls\) program no/);
    expect(statusOf('addon')).toBe('ok');
    expect(statusOf('layer')).toBe('ok');
    expect(code).toBe(1);
  });

  test('an API server where nothing listens: warn "unreachable" naming the server', async () => {
    const server = `http://127.0.0.1:${await deadPort()}`;
    const file = kubeconfig('dead.yaml', { dead: server }, 'dead');
    const { code, byId } = await doctor(['--kubeconfig', file], {});
    const check = byId.get('kubeconfig')!;
    expect(check.status).toBe('warn');
    expect(check.detail).toBe(
      `context "dead", server ${server}: unreachable: connect ECONNREFUSED ${server.slice(7)}`,
    );
    expect(code).toBe(0);
  });

  test('an API server that never answers: warn after the timeout, and doctor still ends', async () => {
    const sockets = new Set<Socket>();
    const silent = createTcpServer((socket) => sockets.add(socket));
    const server = `http://127.0.0.1:${await listen(silent)}`;
    try {
      const file = kubeconfig('silent.yaml', { silent: server }, 'silent');
      const { byId } = await doctor(['--kubeconfig', file], {});
      expect(byId.get('kubeconfig')).toMatchObject({
        status: 'warn',
        detail: `context "silent", server ${server}: unreachable: no answer within 3 s`,
      });
      expect(sockets.size).toBeGreaterThan(0);
    } finally {
      for (const socket of sockets) socket.destroy();
      await close(silent);
    }
  });

  test('the real test cluster: ok with its version; --context picks it', async () => {
    // The admin kubeconfig of the test cluster, with a second context whose server is dead.
    const adminFile = await ensureCluster();
    const admin = JSON.parse(readFileSync(adminFile, 'utf8')) as KubeconfigFile;
    const config = new KubeConfig();
    config.loadFromFile(adminFile);
    const { gitVersion } = await config.makeApiClient(VersionApi).getCode();
    const live = admin.clusters[0]!.cluster.server;
    const dead = `https://127.0.0.1:${await deadPort()}`;
    const file = join(dir, 'two.json');
    writeFileSync(
      file,
      JSON.stringify({
        ...admin,
        clusters: [...admin.clusters, { name: 'prod', cluster: { server: dead } }],
        contexts: [
          { name: 'staging', context: { ...admin.contexts[0]!.context } },
          { name: 'prod', context: { ...admin.contexts[0]!.context, cluster: 'prod' } },
        ],
        'current-context': 'prod',
      }),
    );

    const current = await doctor([], { KUBECONFIG: file });
    expect(current.byId.get('kubeconfig')!.detail).toMatch(
      new RegExp(`^context "prod", server ${dead}: unreachable`),
    );

    const picked = await doctor(['--context', 'staging'], { KUBECONFIG: file });
    expect(picked.byId.get('kubeconfig')).toMatchObject({
      status: 'ok',
      detail: `context "staging", server ${live}: Kubernetes ${gitVersion}`,
    });
    expect(picked.code).toBe(0);

    const unknown = await doctor(['--context', 'qa'], { KUBECONFIG: file });
    expect(unknown.byId.get('kubeconfig')).toMatchObject({
      status: 'warn',
      detail: 'context "qa" is not in the kubeconfig (known: staging, prod)',
    });
  }, 600_000);

  test('a plain http:// server without insecure-skip-tls-verify: warn, says why', async () => {
    const server = `http://127.0.0.1:${await deadPort()}`;
    const file = kubeconfig('plain.yaml', { plain: server }, 'plain', false);
    const { byId } = await doctor(['--kubeconfig', file], {});
    expect(byId.get('kubeconfig')).toMatchObject({
      status: 'warn',
      detail: `context "plain", server ${server}: client-node talks plain http:// only with insecure-skip-tls-verify`,
    });
    expect(byId.get('kubeconfig')!.fix).toMatch(/insecure-skip-tls-verify: true/);
  });
});

describe('doctor checks on given inputs', () => {
  test('kernel: before 5.8 fails, before 6.6 falls back to the legacy tc filter', () => {
    expect(checkKernel('5.4.0-150-generic')).toMatchObject({ status: 'fail' });
    expect(checkKernel('6.1.0-27-amd64')).toMatchObject({
      status: 'ok',
      detail: expect.stringMatching(/legacy tc filter/),
    });
    expect(checkKernel('6.6.0')).toMatchObject({
      status: 'ok',
      detail: expect.stringMatching(/TCX links \(6\.6\+\) available/),
    });
  });

  test('privileges: only CAP_SYS_PTRACE missing is a warning', () => {
    const bit = (n: number): bigint => 1n << BigInt(n);
    const all = bit(12) | bit(19) | bit(21) | bit(39);
    expect(checkPrivileges(all).status).toBe('ok');
    expect(checkPrivileges(all & ~bit(19))).toMatchObject({
      status: 'warn',
      detail: expect.stringMatching(/^missing CAP_SYS_PTRACE/),
    });
    // CAP_SYS_ADMIN stands in for CAP_BPF, but not for CAP_NET_ADMIN.
    expect(checkPrivileges(all & ~bit(39)).status).toBe('ok');
    expect(checkPrivileges(all & ~bit(12))).toMatchObject({
      status: 'fail',
      detail: expect.stringMatching(/^missing CAP_NET_ADMIN/),
    });
  });

  test('an addon that is not one fails with the loader’s reason', async () => {
    const path = join(dir, 'not-an-addon.node');
    writeFileSync(path, 'not an ELF file\n'.repeat(100));
    expect(await checkAddon(path)).toMatchObject({
      status: 'fail',
      detail: `${path} does not load: invalid ELF header`,
      fix: 'run npm run build',
    });
  });

  test('a layer that ld.so cannot preload fails with ld.so’s reason', async () => {
    const path = join(dir, 'not-a-layer.so');
    writeFileSync(path, 'not an ELF file');
    expect(await checkLayer(path)).toMatchObject({
      status: 'fail',
      detail: expect.stringMatching(/does not preload: ERROR: ld\.so: .* cannot be preloaded/),
    });
  });

  test('a layer in a directory closed to other users is a warning', async () => {
    const closed = join(dir, 'closed');
    mkdirSync(closed, { mode: 0o700 });
    const path = join(closed, 'mirrord_layer.so');
    copyFileSync(join(packageRoot(), 'layer', '.output', 'mirrord_layer.so'), path);
    chmodSync(path, 0o644);
    expect(await checkLayer(path)).toMatchObject({
      status: 'warn',
      detail: expect.stringContaining(`${closed} is not searchable by other users`),
    });
  });
});
