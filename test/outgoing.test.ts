/**
 * The app's outgoing connections and look-ups through the target, as a user runs them: the real
 * CLI and agent, a target netns whose peer (another netns) only the target can reach (this
 * machine's route to the test range is a blackhole), and real clients as the app: redis-cli, a
 * Redis client library, curl, node's net and fetch, python's asyncio, getent, dig. What the
 * target reaches: a Redis on its own loopback, servers behind its peer address, names only its
 * hosts file and its nameserver (dnsmasq on its loopback) know.
 */
import { execFileSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { join } from 'node:path';
import { pattern } from './fixtures/outgoing/pattern.mjs';
import { waitForTcp } from '../src/platform/local/netns.js';
import {
  FIXTURES,
  agentsOf,
  killMatching,
  killRun,
  logLines,
  mirrord,
  processesMatching,
  tempDir,
  until,
  untilMirroring,
} from './support/mirror-cli.js';
import { createSandbox, type Sandbox } from './support/sandbox.js';
import { waitFor } from './support/wait.js';

const CLIENT = join(FIXTURES, 'outgoing', 'client.mjs');
const PYTHON_CLIENT = join(FIXTURES, 'outgoing', 'client.py');
/** Debian's python: python3-redis is its library. */
const PYTHON = '/usr/bin/python3';
const TRANSFER_BYTES = 100 * 1024 * 1024;
/** On the target's loopback: nothing on this machine listens there. */
const TARGET_REDIS_PORT = 16390;
const PEER_REDIS_PORT = 16391;

interface AppRun {
  code: number | null;
  /** The app's last JSON line. */
  result: Record<string, unknown>;
  output: string;
}

describe('outgoing connections and DNS through the target', () => {
  let sandbox: Sandbox;
  let peer: string;
  let etc: string;
  const started: ChildProcess[] = [];

  /**
   * Runs `command` as the app under mirror, which must exit with `exitCode` (the app's, or
   * mirror's own for bad input); its last JSON line.
   */
  async function inApp(command: string[], flags: string[] = [], exitCode = 0): Promise<AppRun> {
    const run = mirrord(['--netns', sandbox.target, ...flags, '--', ...command]);
    const code = await run.exited;
    // Also a crash of the CLI after the app's end.
    expect({ code, output: run.output() }).toEqual({ code: exitCode, output: expect.any(String) });
    const lines = run.stdout().trim().split('\n');
    let result: Record<string, unknown> = {};
    try {
      result = JSON.parse(lines[lines.length - 1] ?? '{}') as Record<string, unknown>;
    } catch {
      // Not JSON: the output, for the test's expectation to show.
      result = { output: run.output() };
    }
    return { code, result, output: run.output() };
  }

  const patternSha256 = (bytes: number): string => {
    const hash = createHash('sha256');
    for (const chunk of pattern(bytes)) hash.update(chunk);
    return hash.digest('hex');
  };

  const startIn = (netns: string, command: string, args: string[]): ChildProcess => {
    const child = sandbox.spawn(netns, command, args);
    started.push(child);
    return child;
  };

  beforeAll(async () => {
    sandbox = createSandbox('outgoing');
    peer = sandbox.clientAddress;
    // What `ip netns exec` (and so the agent's resolver) puts over /etc in the target's netns.
    etc = `/etc/netns/${sandbox.target}`;
    mkdirSync(etc, { recursive: true });
    writeFileSync(join(etc, 'hosts'), `127.0.0.1 localhost\n${peer} peer.only-target.test\n`);
    writeFileSync(
      join(etc, 'resolv.conf'),
      'nameserver 127.0.0.53\noptions timeout:2 attempts:2\n',
    );
    const servers = startIn(sandbox.client, process.execPath, [
      join(FIXTURES, 'outgoing', 'servers.mjs'),
      peer,
      String(TRANSFER_BYTES),
    ]);
    startIn(sandbox.target, 'redis-server', [
      '--bind',
      '127.0.0.1',
      '--port',
      String(TARGET_REDIS_PORT),
      '--save',
      '',
      '--appendonly',
      'no',
    ]);
    startIn(sandbox.client, 'redis-server', [
      '--bind',
      peer,
      '--port',
      String(PEER_REDIS_PORT),
      // Its clients come from the target's address, not its loopback.
      '--protected-mode',
      'no',
      '--save',
      '',
      '--appendonly',
      'no',
    ]);
    startIn(sandbox.target, 'dnsmasq', [
      '--keep-in-foreground',
      '--conf-file=/dev/null',
      '--no-resolv',
      '--no-hosts',
      '--user=root',
      '--listen-address=127.0.0.53',
      '--bind-interfaces',
      '--port=53',
      // Every other name is unknown (NXDOMAIN), not refused: there is no upstream.
      '--local=/#/',
      `--address=/dns.only-target.test/${peer}`,
    ]);
    let ready = '';
    servers.stdout!.on('data', (chunk: Buffer) => (ready += chunk.toString()));
    await waitFor('the peer servers', () => ready.includes('ready'));
    await waitFor('the Redis servers and the nameserver', () => {
      try {
        sandbox.run(sandbox.target, 'redis-cli', ['-p', String(TARGET_REDIS_PORT), 'ping']);
        sandbox.run(sandbox.client, 'redis-cli', [
          '-h',
          peer,
          '-p',
          String(PEER_REDIS_PORT),
          'ping',
        ]);
        return sandbox
          .run(sandbox.target, 'dig', [
            '+short',
            '+time=1',
            '+tries=1',
            '@127.0.0.53',
            'dns.only-target.test',
          ])
          .includes(peer);
      } catch {
        return false;
      }
    });
  }, 60_000);

  afterAll(() => {
    for (const child of started) child.kill('SIGKILL');
    sandbox?.destroy();
    rmSync(etc, { recursive: true, force: true });
  });

  afterEach(() => {
    expect(agentsOf(sandbox.target)).toEqual([]);
  });

  test('Redis on the target’s loopback and behind its peer: redis-cli, a Node client, a Python library', async () => {
    // Nothing answers there on this machine: only the target's loopback has this Redis.
    expect(await connects('127.0.0.1', TARGET_REDIS_PORT)).toBe(false);
    const cli = await inApp([
      'redis-cli',
      '-p',
      String(TARGET_REDIS_PORT),
      'SET',
      'greeting',
      'from the app',
    ]);
    expect(cli.output).toContain('OK');
    expect(
      sandbox.run(sandbox.target, 'redis-cli', [
        '-p',
        String(TARGET_REDIS_PORT),
        'GET',
        'greeting',
      ]),
    ).toBe('from the app\n');
    const node = await inApp([
      process.execPath,
      CLIENT,
      'redis',
      '127.0.0.1',
      String(TARGET_REDIS_PORT),
      'node',
    ]);
    expect(node.result.replies).toBe('+OK\r\n$4\r\nnode\r\n');
    const python = await inApp([
      PYTHON,
      PYTHON_CLIENT,
      'redis',
      peer,
      String(PEER_REDIS_PORT),
      'python',
    ]);
    expect(python.result).toEqual({ value: 'python' });
  }, 120_000);

  test('HTTP by a name only the target’s hosts file knows: curl and fetch', async () => {
    const url = 'http://peer.only-target.test:8080/orders';
    const curl = await inApp(['curl', '-sS', '--max-time', '20', url]);
    expect(curl.output).toContain(`hello from ${peer} to ${sandbox.targetAddress} for /orders`);
    const fetched = await inApp([process.execPath, CLIENT, 'fetch', url]);
    expect(fetched.result).toEqual({
      status: 200,
      body: `hello from ${peer} to ${sandbox.targetAddress} for /orders\n`,
    });
  }, 120_000);

  test('names as the target resolves them: getent, getaddrinfo, gethostbyname_r, dns.lookup, dig over UDP and TCP', async () => {
    const getent = await inApp(['getent', 'hosts', 'dns.only-target.test']);
    expect(getent.output).toMatch(
      new RegExp(`^${peer.replace(/\./g, '\\.')}\\s+dns\\.only-target\\.test`, 'm'),
    );
    expect(await inApp([PYTHON, PYTHON_CLIENT, 'lookup', 'peer.only-target.test'])).toMatchObject({
      result: { addresses: [peer] },
    });
    expect(
      await inApp([PYTHON, PYTHON_CLIENT, 'lookup', 'nowhere.only-target.test']),
    ).toMatchObject({
      result: { error: 'NONAME' },
    });
    expect(await inApp([PYTHON, PYTHON_CLIENT, 'hostent', 'dns.only-target.test'])).toMatchObject({
      result: { host: 'dns.only-target.test', addresses: [peer] },
    });
    expect(await inApp([process.execPath, CLIENT, 'lookup', 'dns.only-target.test'])).toMatchObject(
      {
        result: { addresses: [{ address: peer, family: 4 }] },
      },
    );
    // dig speaks DNS itself, to the target's nameserver on the target's loopback.
    for (const transport of ['+notcp', '+tcp']) {
      const dig = await inApp([
        'dig',
        '+short',
        '+time=5',
        '+tries=1',
        transport,
        '@127.0.0.53',
        'dns.only-target.test',
      ]);
      expect(dig.output.trim().split('\n')).toContain(peer);
    }
  }, 120_000);

  test('100 MB each way, byte for byte', async () => {
    const expected = patternSha256(TRANSFER_BYTES);
    const upload = await inApp([
      process.execPath,
      CLIENT,
      'upload',
      peer,
      '7002',
      String(TRANSFER_BYTES),
    ]);
    expect(upload.result).toEqual({ sent: expected, answer: `${expected} ${TRANSFER_BYTES}` });
    const download = await inApp([process.execPath, CLIENT, 'download', peer, '7003']);
    expect(download.result).toEqual({ outcome: 'end', count: TRANSFER_BYTES, sha256: expected });
  }, 180_000);

  test('500 connections at once', async () => {
    const many = await inApp([process.execPath, CLIENT, 'many', peer, '7001', '500']);
    expect(many.result).toEqual({ ok: 500 });
  }, 120_000);

  test('refused, unreachable and timed out as the target sees them; half-close both ways; socket names', async () => {
    const errors = await inApp([
      process.execPath,
      CLIENT,
      'errors',
      `127.0.0.1:${TARGET_REDIS_PORT + 1}`,
      `${peer}:1`,
      '10.213.251.1:80',
      `${peer.replace(/\.\d+$/, '.99')}:80`,
    ]);
    expect(errors.result).toEqual({
      [`127.0.0.1:${TARGET_REDIS_PORT + 1}`]: 'ECONNREFUSED',
      [`${peer}:1`]: 'ECONNREFUSED',
      // No route in the target's netns.
      '10.213.251.1:80': 'ENETUNREACH',
      // On the target's subnet, but nobody answers its ARP.
      [`${peer.replace(/\.\d+$/, '.99')}:80`]: 'EHOSTUNREACH',
    });
    // A neighbour that takes the target's SYNs and never answers; the target gives up after
    // one retry (its own sysctl: the app sees the target's timeout, whatever this machine's).
    const silent = peer.replace(/\.\d+$/, '.98');
    execFileSync('ip', [
      '-n',
      sandbox.target,
      'neigh',
      'replace',
      silent,
      'lladdr',
      '02:00:00:00:00:98',
      'dev',
      'eth0',
      'nud',
      'permanent',
    ]);
    sandbox.run(sandbox.target, 'sysctl', ['-qw', 'net.ipv4.tcp_syn_retries=1']);
    try {
      const timedOut = await inApp([process.execPath, CLIENT, 'errors', `${silent}:80`]);
      expect(timedOut.result).toEqual({ [`${silent}:80`]: 'ETIMEDOUT' });
    } finally {
      sandbox.run(sandbox.target, 'sysctl', ['-qw', 'net.ipv4.tcp_syn_retries=6']);
    }
    // The app ends its side first and reads the answer; the server ends after answering.
    const halfClose = await inApp([process.execPath, CLIENT, 'half-close', peer, '7004']);
    expect(halfClose.result).toEqual({ answer: 'got 12 bytes after your end\n' });
    const names = await inApp([process.execPath, CLIENT, 'names', peer, '7001']);
    expect(names.result.peer).toBe(`${peer}:7001`);
    expect(names.result.local).toMatch(
      new RegExp(`^${sandbox.targetAddress.replace(/\./g, '\\.')}:\\d+$`),
    );
    const python = await inApp([PYTHON, PYTHON_CLIENT, 'asyncio', peer, '7001']);
    expect(python.result).toMatchObject({
      line: 'through asyncio\n',
      peer: [peer, 7001],
      local: [sandbox.targetAddress, expect.any(Number)],
    });
  }, 120_000);

  test('UDP: sendto and a connected socket, answered from the real server', async () => {
    const udp = await inApp([PYTHON, PYTHON_CLIENT, 'udp', peer, '7005']);
    expect(udp.result).toEqual({
      sendto: ['echo:sendto', [peer, 7005]],
      connected: ['echo:connected', [peer, 7005]],
    });
  }, 60_000);

  test('rules keep destinations local; --no-outgoing keeps everything local', async () => {
    const local = http.createServer((_, response) => response.end('this machine\n'));
    await new Promise<void>((resolve) => local.listen(0, '127.0.0.1', resolve));
    const port = (local.address() as net.AddressInfo).port;
    try {
      const kept = await inApp(
        ['curl', '-sS', `http://127.0.0.1:${port}/`],
        ['--outgoing-local', `127.0.0.1:${port}`],
      );
      expect(kept.output).toContain('this machine');
      // localhost is the target's: there, nothing listens on that port.
      const remote = await inApp([process.execPath, CLIENT, 'errors', `127.0.0.1:${port}`]);
      expect(remote.result).toEqual({ [`127.0.0.1:${port}`]: 'ECONNREFUSED' });
      const localhost = await inApp(
        ['curl', '-sS', `http://127.0.0.1:${port}/`],
        ['--localhost', 'local'],
      );
      expect(localhost.output).toContain('this machine');
    } finally {
      local.close();
    }
    // The same settings in mirrord.json.
    const configDir = tempDir('outgoing-config');
    const config = join(configDir.path, 'mirrord.json');
    writeFileSync(config, JSON.stringify({ outgoing: false }));
    try {
      const offByFile = await inApp(
        [PYTHON, PYTHON_CLIENT, 'lookup', 'peer.only-target.test'],
        ['--config', config],
      );
      expect(offByFile.result).toEqual({ error: 'NONAME' });
    } finally {
      configDir.remove();
    }
    const off = await inApp(
      [PYTHON, PYTHON_CLIENT, 'lookup', 'peer.only-target.test'],
      ['--no-outgoing'],
    );
    expect(off.result).toEqual({ error: 'NONAME' });
    const bad = await inApp(['true'], ['--outgoing-local', '10.0.0.0/33'], 2);
    expect(bad.output.trim()).toBe(
      'mirrord: --outgoing-local "10.0.0.0/33": /33 is not a prefix from 0 to 32; give CIDR or HOST, with :PORT for one port ([IPV6]:PORT)',
    );
  }, 120_000);

  test('a server that serves mirrored requests calls a backend only the target reaches: nginx (pre-fork, epoll)', async () => {
    const port = 21000 + Math.floor(Math.random() * 5000);
    const dir = tempDir('outgoing-nginx');
    // The target's own server on the port, which its clients get their answers from.
    startIn(sandbox.target, PYTHON, [
      '-m',
      'http.server',
      String(port),
      '--bind',
      sandbox.targetAddress,
    ]);
    const conf = join(dir.path, 'nginx.conf');
    writeFileSync(
      conf,
      [
        'daemon off;',
        'master_process on;',
        'worker_processes 2;',
        'user root;',
        `pid ${dir.path}/nginx.pid;`,
        `error_log ${dir.path}/error.log;`,
        'events { worker_connections 64; }',
        'http {',
        "  log_format upstream '$request_uri $upstream_addr $upstream_status';",
        `  access_log ${dir.path}/access.log upstream;`,
        ...['client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi'].map(
          (kind) => `  ${kind}_temp_path ${dir.path}/${kind};`,
        ),
        // The replay ends a mirrored connection when the target's client did, which may be
        // before the backend answered nginx: nginx then finishes the request all the same.
        '  proxy_ignore_client_abort on;',
        // Resolved once, when nginx reads this, through the target's hosts file.
        `  server { listen ${port}; location / { proxy_pass http://peer.only-target.test:8080; } }`,
        '}',
      ].join('\n'),
    );
    const run = mirrord(['--netns', sandbox.target, '--json', '--', 'nginx', '-c', conf]);
    try {
      await waitForTcp(sandbox.target, sandbox.targetAddress, port);
      await untilMirroring(run, sandbox, port);
      expect(run.output()).toContain('writes twice, once by the target and once by the app');
      for (const order of [1, 2, 3]) {
        sandbox.run(sandbox.client, 'curl', [
          '-sS',
          '-o',
          '/dev/null',
          `http://${sandbox.targetAddress}:${port}/order-${order}`,
        ]);
      }
      const proxied = (): string[] =>
        logLines(join(dir.path, 'access.log')).filter((line) => line.startsWith('/order-'));
      await until(() => proxied().length >= 3, 'nginx to proxy the 3 mirrored requests');
      expect(proxied().sort()).toEqual(
        [1, 2, 3].map((order) => `/order-${order} ${peer}:8080 200`),
      );
      run.child.kill('SIGINT');
      expect(await run.exited).toBe(130);
      expect(processesMatching(conf)).toEqual([]);
    } finally {
      await killRun(run);
      killMatching(conf);
      dir.remove();
    }
  }, 120_000);

  test('a Redis replica as the app follows a master on the target’s loopback (its own event loop)', async () => {
    const port = 26000 + Math.floor(Math.random() * 4000);
    // A replica writes what its master sends to its directory: a temporary one, never the
    // working directory, where another test's Redis would load it.
    const dir = tempDir('outgoing-replica');
    const run = mirrord([
      '--netns',
      sandbox.target,
      '--',
      'redis-server',
      '--bind',
      '127.0.0.1',
      '--port',
      String(port),
      '--replicaof',
      '127.0.0.1',
      String(TARGET_REDIS_PORT),
      '--save',
      '',
      '--appendonly',
      'no',
      '--dir',
      dir.path,
    ]);
    try {
      sandbox.run(sandbox.target, 'redis-cli', [
        '-p',
        String(TARGET_REDIS_PORT),
        'SET',
        'replicated',
        'from the target',
      ]);
      await waitFor('the local replica to have the target master’s key', () => {
        try {
          return (
            execFileSync('redis-cli', ['-p', String(port), 'GET', 'replicated'], {
              encoding: 'utf8',
            }) === 'from the target\n'
          );
        } catch {
          return false;
        }
      });
      const info = execFileSync('redis-cli', ['-p', String(port), 'INFO', 'replication'], {
        encoding: 'utf8',
      });
      expect(info).toContain('master_link_status:up');
    } finally {
      await killRun(run);
      dir.remove();
    }
  }, 120_000);

  test('a killed agent: the app’s connection fails at once, and nothing is left', async () => {
    const run = mirrord(
      ['--netns', sandbox.target, '--', process.execPath, CLIENT, 'download', peer, '7006'],
      {
        env: { SAY_STARTED: '1', HOLD_SIGTERM: '1' },
      },
    );
    await waitFor('the download to start', () => run.output().includes('started'));
    const [agent] = agentsOf(sandbox.target);
    process.kill(Number(agent), 'SIGKILL');
    await run.exited;
    expect(run.output()).toMatch(/"outcome":"(ECONNRESET|EPIPE)"/);
    expect(processesMatching(CLIENT)).toEqual([]);
  }, 120_000);
});

function connects(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, host, () => {
      socket.destroy();
      resolve(true);
    });
    socket.on('error', () => resolve(false));
  });
}
