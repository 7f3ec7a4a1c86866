/**
 * `mirrord mirror` with real server programs: the same program runs as the target (in a sandbox
 * netns, with real clients) and as the local app (COMMAND, under the layer), and what the local
 * copy saw must be what the target saw, request for request, connection for connection.
 */
import { execFile, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { waitForTcp } from '../src/platform/local/netns.js';
import {
  FIXTURES,
  LAYER,
  agentsOf,
  byConnection,
  killMatching,
  killRun,
  logLines,
  mirrorInto,
  sortedRecord,
  tempDir,
  until,
  untilAsync,
  untilMirroring,
  untilWhileRunning,
  type MirrorRun,
} from './support/mirror-cli.js';
import { prng } from './support/prng.js';
import { createSandbox, type Sandbox } from './support/sandbox.js';

const execFileAsync = promisify(execFile);

/** Below the ephemeral range, so that no outgoing connection holds it. */
const randomPort = (): number => 20_000 + Math.floor(Math.random() * 10_000);

const NOBODY = ['--reuid=65534', '--regid=65534', '--clear-groups'];

describe('mirrord mirror into real servers', () => {
  let sandbox: Sandbox;
  let dir: ReturnType<typeof tempDir>;
  const runs: MirrorRun[] = [];

  beforeEach(() => {
    sandbox = createSandbox('servers');
    dir = tempDir('servers');
  });

  afterEach(async () => {
    for (const run of runs.splice(0)) await killRun(run);
    // A local app left by a killed mirror: found by its files in its arguments.
    killMatching(dir.path);
    sandbox.destroy();
    dir.remove();
  });

  /** Ends the session as a user does (Ctrl-C) and checks that no agent is left. */
  async function interrupt(run: MirrorRun): Promise<void> {
    run.child.kill('SIGINT');
    expect(await run.exited).toBe(130);
    expect(agentsOf(sandbox.target)).toEqual([]);
  }

  /**
   * Target and local app logged one line per request, `CLIENT:PORT METHOD PATH DIGEST`: the
   * local app must have seen every connection with the same original client, and on each the
   * same requests in the same order.
   */
  async function expectSameRequests(targetLog: string, localLog: string, requests: number) {
    await until(() => logLines(targetLog).length >= requests, `${requests} requests at the target`);
    await until(
      () => logLines(localLog).length >= requests,
      `${requests} requests in the local app (it has ${logLines(localLog).length})`,
      60_000,
    );
    const target = byConnection(logLines(targetLog));
    const local = byConnection(logLines(localLog));
    expect(sortedRecord(local)).toEqual(sortedRecord(target));
    return target;
  }

  test('Node http: the local copy gets every request of every keep-alive connection, from the original client', async () => {
    const port = randomPort();
    const server = join(FIXTURES, 'http-log-server.mjs');
    const targetLog = join(dir.path, 'target.log');
    const localLog = join(dir.path, 'local.log');
    sandbox.spawn(sandbox.target, process.execPath, [server, String(port), targetLog]);
    await waitForTcp(sandbox.client, sandbox.targetAddress, port);
    const run = mirrorInto(sandbox.target, [process.execPath, server, String(port), localLog]);
    runs.push(run);
    await untilMirroring(run, sandbox, port);

    // curl keeps one connection for all the URLs of one invocation (--next varies the request).
    const random = prng(1);
    const clients = [0, 1, 2, 3].map((client) => {
      const args: string[] = [];
      const bodies: Buffer[] = [];
      for (let request = 0; request < 15; request += 1) {
        const method = ['GET', 'POST', 'PUT', 'PATCH'][Math.floor(random() * 4)]!;
        const body =
          method === 'GET' ? Buffer.alloc(0) : randomBytes(Math.floor(random() * 40_000));
        const bodyFile = join(dir.path, `body-${client}-${request}`);
        writeFileSync(bodyFile, body);
        bodies.push(body);
        if (request > 0) args.push('--next');
        args.push('-sS', '-X', method, '-H', `X-Request: ${client}.${request}`);
        if (method !== 'GET') args.push('--data-binary', `@${bodyFile}`);
        args.push('-o', join(dir.path, `answer-${client}-${request}`));
        args.push(`http://${sandbox.targetAddress}:${port}/c${client}/r${request}?n=${random()}`);
      }
      return { bodies, done: sandbox.runAsync(sandbox.client, 'curl', args) };
    });
    await Promise.all(clients.map((c) => c.done));
    // The target answered each request correctly (the sha256 of its body).
    clients.forEach(({ bodies }, client) =>
      bodies.forEach((body, request) =>
        expect(readFileSync(join(dir.path, `answer-${client}-${request}`), 'utf8')).toBe(
          createHash('sha256').update(body).digest('hex'),
        ),
      ),
    );

    const target = await expectSameRequests(targetLog, localLog, 60);
    expect([...target.values()].map((requests) => requests.length)).toEqual([15, 15, 15, 15]);
    for (const connection of target.keys()) {
      expect(connection).toMatch(new RegExp(`^::ffff:${sandbox.clientAddress}:\\d+$`));
    }
    await interrupt(run);
  });

  test('Python http.server: the same, with a Python client on four keep-alive connections', async () => {
    const port = randomPort();
    const server = join(FIXTURES, 'http_log_server.py');
    const targetLog = join(dir.path, 'target.log');
    const localLog = join(dir.path, 'local.log');
    sandbox.spawn(sandbox.target, 'python3', [server, String(port), targetLog]);
    await waitForTcp(sandbox.client, sandbox.targetAddress, port);
    const run = mirrorInto(sandbox.target, ['python3', server, String(port), localLog]);
    runs.push(run);
    await untilMirroring(run, sandbox, port);

    const answer = await sandbox.runAsync(sandbox.client, 'python3', [
      join(FIXTURES, 'http_keepalive_client.py'),
      sandbox.targetAddress,
      String(port),
      '4',
      '30',
      '7',
    ]);
    const client = JSON.parse(answer) as { requests: number; connections: number[]; wrong: [] };
    expect(client).toMatchObject({ requests: 120, wrong: [] });

    const target = await expectSameRequests(targetLog, localLog, 120);
    expect([...target.keys()].sort()).toEqual(
      client.connections.map((p) => `${sandbox.clientAddress}:${p}`).sort(),
    );
    expect([...target.values()].map((requests) => requests.length)).toEqual([30, 30, 30, 30]);
    await interrupt(run);
  });

  test('redis-server: after redis-benchmark and redis-cli, the local copy holds the same data and ran the same commands', async () => {
    const port = randomPort();
    const redis = (socket: string): string[] => [
      '--port',
      String(port),
      '--save',
      '',
      '--appendonly',
      'no',
      // Clients come from another host (the client netns; the layer reports them in the copy).
      '--protected-mode',
      'no',
      // The test reads each instance's state through a unix socket: the tap sees only TCP, so
      // reading the target does not add commands to the copy.
      '--unixsocket',
      socket,
    ];
    const targetSocket = join(dir.path, 'target.sock');
    const localSocket = join(dir.path, 'local.sock');
    sandbox.spawn(sandbox.target, 'redis-server', redis(targetSocket));
    await waitForTcp(sandbox.client, sandbox.targetAddress, port);
    const run = mirrorInto(sandbox.target, ['redis-server', ...redis(localSocket)]);
    runs.push(run);
    await untilMirroring(run, sandbox, port);

    const at = ['-h', sandbox.targetAddress, '-p', String(port)];
    // redis-benchmark writes constant values, INCRs and set/hash members: whatever order its
    // connections' commands interleave in, the resulting data is the same.
    const tests = 'ping,set,get,incr,lpush,rpush,sadd,hset,mset';
    const benchmarks = [
      ['-c', '12', '-n', '2000', '-r', '500', '-d', '64', '-t', tests, '-q'],
      ['-c', '4', '-n', '2000', '-r', '500', '-P', '16', '-t', 'set,incr,lpush,sadd', '-q'],
    ].map((args) => sandbox.runAsync(sandbox.client, 'redis-benchmark', [...at, ...args]));
    // redis-cli --pipe sends a stream of commands with binary values; each stream has its own
    // keys, so the order within the stream is all that matters.
    const pipes = ['alpha', 'beta', 'gamma'].map((prefix, index) => {
      const file = join(dir.path, `${prefix}.resp`);
      writeFileSync(file, commandStream(prefix, index + 1));
      return sandbox.runAsync(sandbox.client, 'bash', [
        '-c',
        `redis-cli ${at.join(' ')} --pipe < ${file}`,
      ]);
    });
    const interactive = sandbox.runAsync(sandbox.client, 'bash', [
      '-c',
      `printf 'SET greeting hello\\nRPUSH queue a b c\\nGET greeting\\nLRANGE queue 0 -1\\n' | redis-cli ${at.join(' ')}`,
    ]);
    await Promise.all([...benchmarks, ...pipes]);
    expect(await interactive).toBe('OK\n3\nhello\na\nb\nc\n');

    // Catch-up: the copy has run the commands the target ran.
    const targetStats = await commandStats(targetSocket);
    let localStats = await commandStats(localSocket);
    await untilAsync(
      async () => {
        localStats = await commandStats(localSocket);
        return JSON.stringify(localStats) === JSON.stringify(targetStats);
      },
      'the local copy to run the same commands',
      60_000,
    ).catch(() => undefined);
    expect(localStats).toEqual(targetStats);
    expect(targetStats.set).toMatch(/^calls=\d{4,}/);

    const targetData = await dataDigest(targetSocket);
    expect(targetData.length).toBeGreaterThan(1000);
    expect(await dataDigest(localSocket)).toEqual(targetData);
    await interrupt(run);
  });

  test('an app that binds port 80 as an unprivileged user (setpriv) gets the target’s port-80 traffic', async () => {
    // setpriv keeps the environment, so the layer comes along through LD_PRELOAD; nobody must
    // be able to read it.
    const layerReadable = spawnSync('setpriv', [...NOBODY, 'test', '-r', LAYER]).status === 0;
    expect({ layerReadableByNobody: layerReadable }).toEqual({ layerReadableByNobody: true });

    sandbox.spawn(sandbox.target, process.execPath, [
      '-e',
      `require('http').createServer((q, r) => { q.resume(); q.on('end', () => r.end('staging')); }).listen(80)`,
    ]);
    await waitForTcp(sandbox.client, sandbox.targetAddress, 80);
    const app = `
const server = require('http').createServer((q, r) => {
  q.resume();
  q.on('end', () => {
    console.log('got ' + q.url + ' from ' + q.socket.remoteAddress + ' on ' + server.address().port + ' as uid ' + process.getuid());
    r.end('local');
  });
}).listen(80, () => console.log('app listening on ' + server.address().port));`;
    const run = mirrorInto(sandbox.target, ['setpriv', ...NOBODY, process.execPath, '-e', app]);
    runs.push(run);
    await untilMirroring(run, sandbox, 80);
    expect(run.stdout()).toContain('app listening on 80');

    for (const i of [1, 2, 3]) {
      const answer = await sandbox.runAsync(sandbox.client, 'curl', [
        '-sS',
        '--max-time',
        '10',
        '-d',
        `n=${i}`,
        `http://${sandbox.targetAddress}/privileged/${i}`,
      ]);
      expect(answer).toBe('staging');
    }
    for (const i of [1, 2, 3]) {
      await untilWhileRunning(
        run,
        () =>
          run
            .stdout()
            .includes(
              `got /privileged/${i} from ::ffff:${sandbox.clientAddress} on 80 as uid 65534`,
            ),
        `request ${i} in the app`,
      );
    }
    await interrupt(run);
  });
});

/** RESP for one command. */
function resp(args: (string | Buffer)[]): Buffer {
  const parts: Buffer[] = [Buffer.from(`*${args.length}\r\n`)];
  for (const arg of args) {
    const bytes = Buffer.isBuffer(arg) ? arg : Buffer.from(arg);
    parts.push(Buffer.from(`$${bytes.length}\r\n`), bytes, Buffer.from('\r\n'));
  }
  return Buffer.concat(parts);
}

/** A deterministic stream of writes to keys under `prefix`, with binary values. */
function commandStream(prefix: string, seed: number): Buffer {
  const random = prng(seed);
  const bytes = (max: number): Buffer =>
    Buffer.from(Array.from({ length: Math.floor(random() * max) }, () => (random() * 256) | 0));
  const commands: Buffer[] = [];
  for (let i = 0; i < 400; i += 1) {
    commands.push(resp(['SET', `${prefix}:str:${i}`, bytes(4000)]));
    commands.push(resp(['APPEND', `${prefix}:str:${i % 50}`, bytes(200)]));
    commands.push(resp(['HSET', `${prefix}:hash:${i % 20}`, `f${i}`, bytes(100)]));
    commands.push(resp(['RPUSH', `${prefix}:list:${i % 10}`, bytes(100)]));
    commands.push(resp(['ZADD', `${prefix}:zset`, String(i), bytes(20).toString('hex')]));
    commands.push(resp(['SADD', `${prefix}:set:${i % 5}`, bytes(30)]));
    commands.push(resp(['INCRBY', `${prefix}:counter`, String(i)]));
    if (i % 7 === 0) commands.push(resp(['DEL', `${prefix}:str:${i >> 1}`]));
    if (i % 11 === 0) commands.push(resp(['LPOP', `${prefix}:list:${i % 10}`]));
  }
  return Buffer.concat(commands);
}

/** INFO commandstats by command: calls, rejected and failed (not timings, nor INFO itself). */
async function commandStats(socket: string): Promise<Record<string, string>> {
  const { stdout } = await execFileAsync('redis-cli', ['-s', socket, 'INFO', 'commandstats']);
  const stats: [string, string][] = [];
  for (const match of stdout.matchAll(
    /^cmdstat_(\S+):calls=(\d+),.*rejected_calls=(\d+),failed_calls=(\d+)/gm,
  )) {
    const [, command, calls, rejected, failed] = match;
    if (command !== 'info')
      stats.push([command!, `calls=${calls},rejected=${rejected},failed=${failed}`]);
  }
  // Sorted, so that equal stats are equal JSON.
  return Object.fromEntries(stats.sort(([a], [b]) => a.localeCompare(b)));
}

/**
 * Every key with its type and a sha1 of its content, sorted: members of sets and hashes sorted
 * too, since their order inside Redis depends on the order of insertion, which may differ
 * between connections; list and sorted-set order is content. Run once per instance, after
 * commandStats (the script's own reads show up there).
 */
const DIGEST_SCRIPT = `
local out = {}
for _, key in ipairs(redis.call('KEYS', '*')) do
  local kind = redis.call('TYPE', key)['ok']
  local parts
  if kind == 'string' then parts = { redis.call('GET', key) }
  elseif kind == 'list' then parts = redis.call('LRANGE', key, 0, -1)
  elseif kind == 'set' then parts = redis.call('SMEMBERS', key); table.sort(parts)
  elseif kind == 'zset' then parts = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  elseif kind == 'hash' then
    local flat = redis.call('HGETALL', key)
    parts = {}
    for i = 1, #flat, 2 do parts[#parts + 1] = redis.sha1hex(flat[i]) .. redis.sha1hex(flat[i + 1]) end
    table.sort(parts)
  else parts = {} end
  local sizes = {}
  for i, part in ipairs(parts) do sizes[i] = #part end
  out[#out + 1] = key .. ' ' .. kind .. ' ' .. redis.sha1hex(table.concat(sizes, ',') .. '|' .. table.concat(parts))
end
table.sort(out)
return out`;

async function dataDigest(socket: string): Promise<string[]> {
  const { stdout } = await execFileAsync('redis-cli', ['-s', socket, 'EVAL', DIGEST_SCRIPT, '0'], {
    maxBuffer: 64 * 1024 * 1024,
  });
  return stdout.split('\n').filter(Boolean);
}
