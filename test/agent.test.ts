/**
 * The agent end to end: a real `mirrord agent` process tapping a real netns, real clients
 * sending real traffic, and a session (the protocol client the CLI uses) checking what arrives.
 */
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import net from 'node:net';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startLocalAgent } from '../src/platform/local/agent-process.js';
import { SECRET_ENV } from '../src/protocol/agent-launch.js';
import { waitForTcp } from '../src/platform/local/netns.js';
import { connectToAgent } from '../src/protocol/client.js';
import { FrameDecoder } from '../src/protocol/framing.js';
import { parseAgentMessage, type AgentMessage } from '../src/protocol/messages.js';
import { MirrorSession } from './support/mirror-session.js';
import { pythonClient, sinkServer, stdinClient, untilAcked } from './support/programs.js';
import { createSandbox, type Sandbox } from './support/sandbox.js';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const CLI = join(ROOT, 'bin', 'run.js');
const DROP_OBJ = join(ROOT, 'agent-bpf', '.output', 'drop.bpf.o');
const PORT = 7000;

const SINK_SERVER = sinkServer(PORT);

/** N concurrent connections, each sending its own random bytes; prints their digests. */
const CONCURRENT_CLIENT = `
import asyncio, hashlib, json, os, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
async def one(i):
    reader, writer = await asyncio.open_connection(host, port)
    local_port = writer.get_extra_info("sockname")[1]
    data = os.urandom(500 + (i * 7919) % 40000)
    writer.write(data)
    await writer.drain()
    writer.write_eof()
    await reader.read()
    writer.close()
    return {"port": local_port, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
async def main():
    print(json.dumps(await asyncio.gather(*(one(i) for i in range(count)))))
asyncio.run(main())
`;

/**
 * One connection uploading N MiB of seeded random bytes, paced at 1 Gbit/s (a fast client; the
 * benchmark finds the highest rate the agent keeps up with); prints port, digest and size.
 */
const UPLOAD_CLIENT = `
import hashlib, json, random, socket, sys
host, port, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng, digest = random.Random(7), hashlib.sha256()
s = socket.create_connection((host, port))
s.setsockopt(socket.SOL_SOCKET, 47, 125_000_000)  # SO_MAX_PACING_RATE, bytes per second
for _ in range(mib):
    chunk = rng.randbytes(1 << 20)
    digest.update(chunk)
    s.sendall(chunk)
s.shutdown(socket.SHUT_WR)
s.recv(64)
print(json.dumps({"port": s.getsockname()[1], "sha256": digest.hexdigest(), "bytes": mib << 20}))
`;

interface Sent {
  port: number;
  sha256: string;
  bytes: number;
}

/**
 * The BPF links a process holds, by id, from its fdinfo (bpftool 7.1 cannot list TCX links by
 * interface or netns); other tests' agents may run at the same time, so the checks look only at
 * the links of the agent under test.
 */
function linksHeldBy(pid: number): number[] {
  const ids: number[] = [];
  for (const fd of readdirSync(`/proc/${pid}/fdinfo`)) {
    const match = /^link_id:\s+(\d+)$/m.exec(readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'));
    if (match) ids.push(Number(match[1]));
  }
  return ids;
}

/** Which of these links still exist anywhere on the machine. */
function linksAlive(ids: number[]): number[] {
  const links = JSON.parse(
    execFileSync('bpftool', ['-j', 'link', 'show'], { encoding: 'utf8' }),
  ) as {
    id: number;
  }[];
  return links.map((l) => l.id).filter((id) => ids.includes(id));
}

async function startSink(sandbox: Sandbox): Promise<void> {
  sandbox.spawn(sandbox.target, process.execPath, ['-e', SINK_SERVER]);
  await waitForTcp(sandbox.client, sandbox.targetAddress, PORT);
}

/** Runs UPLOAD_CLIENT in the client netns and returns what it sent. */
async function upload(sandbox: Sandbox, mib: number): Promise<Sent> {
  const out = await pythonClient(sandbox, UPLOAD_CLIENT, PORT, String(mib));
  return JSON.parse(out) as Sent;
}

function runCli(
  args: string[],
  env: NodeJS.ProcessEnv = { ...process.env, [SECRET_ENV]: 'agent-test' },
): { status: number; stdout: string; stderr: string } {
  try {
    const stdout = execFileSync(process.execPath, [CLI, ...args], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'pipe'],
      timeout: 30_000,
      env,
    });
    return { status: 0, stdout, stderr: '' };
  } catch (error) {
    const failed = error as { status: number; stdout: string; stderr: string };
    return { status: failed.status, stdout: failed.stdout, stderr: failed.stderr };
  }
}

function expectMirrored(session: MirrorSession, sent: Sent[]): void {
  const byPort = new Map(
    [...session.connections.values()].map((c) => [c.opened.client.port, c] as const),
  );
  for (const expected of sent) {
    const mirrored = byPort.get(expected.port);
    expect(mirrored?.closed?.reason).toBe('fin');
    expect(mirrored?.bytes).toBe(expected.bytes);
    expect(mirrored?.digest.digest('hex')).toBe(expected.sha256);
  }
}

/**
 * Once everything sent was mirrored and nothing is in flight, the agent's counters account for
 * every byte the tap copied: sent to the session (what the session got), ignored, or dropped.
 */
async function expectAgentAccounted(session: MirrorSession): Promise<void> {
  let received = 0;
  for (const connection of session.connections.values()) received += connection.bytes;
  let counters = await session.nextCounters();
  // The kernel's count may include segments the agent takes in its next batch.
  while (counters.bytesInAgent > 0) counters = await session.nextCounters();
  expect({
    mirrored: counters.bytesMirrored,
    copied: counters.bytesMirrored + counters.bytesIgnored + counters.bytesDroppedAgent,
  }).toEqual({ mirrored: received, copied: counters.bytesCopied });
}

describe('mirrord agent', () => {
  let sandbox: Sandbox;
  let session: MirrorSession | undefined;

  beforeEach(async () => {
    sandbox = createSandbox('agent');
    await startSink(sandbox);
  });

  afterEach(async () => {
    await session?.stop().catch(() => undefined);
    session = undefined;
    sandbox.destroy();
  });

  test('mirrors 500 concurrent connections byte-exact, with their original addresses', async () => {
    session = await MirrorSession.start({ netns: sandbox.target }, [PORT]);
    const sent = JSON.parse(await pythonClient(sandbox, CONCURRENT_CLIENT, PORT, '500')) as Sent[];
    const current = session;
    await current
      .until(() => current.closedConnections().length >= 500, '500 closed connections')
      .catch(async (error: Error) => {
        // What the agent saw, so that a loss says where it happened (the kernel's ring buffer,
        // the agent) rather than only that a connection is missing.
        const counters = await current.nextCounters();
        throw new Error(
          `${error.message}: ${current.connections.size} opened, ${current.closedConnections().length} closed; agent counters ${JSON.stringify(counters)}`,
        );
      });
    expectMirrored(current, sent);
    await expectAgentAccounted(current);
    for (const connection of current.connections.values()) {
      expect(connection.opened).toMatchObject({
        family: 4,
        client: { address: sandbox.clientAddress },
        server: { address: sandbox.targetAddress, port: PORT },
        interface: 'eth0',
        midStream: false,
      });
    }
  });

  test('mirrors a 128 MiB upload byte-exact', async () => {
    session = await MirrorSession.start({ netns: sandbox.target }, [PORT]);
    const sent = await upload(sandbox, 128);
    const current = session;
    await current.until(() => current.closedConnections().length === 1, 'the upload to close');
    // The counters first: if the upload broke, they say who dropped it (the kernel's ring, or
    // the agent for a session that fell behind).
    const counters = await current.nextCounters();
    expect(counters).toMatchObject({
      segmentsDroppedKernel: 0,
      connectionsDroppedAgent: 0,
      bytesDroppedAgent: 0,
      connectionsOpen: 0,
    });
    expect(counters.bytesCopied).toBeGreaterThanOrEqual(sent.bytes);
    expectMirrored(current, [sent]);
    await expectAgentAccounted(current);
  });

  test('segments lost on the way and retransmitted still reassemble exactly', async () => {
    const tc = (...args: string[]): string => sandbox.run(sandbox.client, 'tc', args);
    tc('qdisc', 'add', 'dev', 'eth0', 'clsact');
    tc('filter', 'add', 'dev', 'eth0', 'egress', 'bpf', 'da', 'obj', DROP_OBJ, 'sec', 'tc');
    const retransmits = (): number =>
      Number(
        /TcpRetransSegs\s+(\d+)/.exec(sandbox.run(sandbox.client, 'nstat', ['-az']))?.[1] ?? 0,
      );
    const before = retransmits();
    session = await MirrorSession.start({ netns: sandbox.target }, [PORT]);
    const sent = await upload(sandbox, 16);
    const current = session;
    await current.until(() => current.closedConnections().length === 1, 'the upload to close');
    expect(retransmits() - before).toBeGreaterThan(10);
    expectMirrored(current, [sent]);
    await expectAgentAccounted(current);
  });

  test('a connection opened before the subscription is flagged mid-stream', async () => {
    const client = stdinClient(sandbox, PORT);
    client.stdin!.write('sent before mirroring\n');
    await untilAcked(sandbox, PORT, 'sent before mirroring\n'.length);
    session = await MirrorSession.start({ netns: sandbox.target }, [PORT]);
    client.stdin!.end('sent while mirrored\n');
    const current = session;
    await current.until(() => current.closedConnections().length === 1, 'the connection to close');
    const [connection] = current.connections.values();
    expect(connection?.opened.midStream).toBe(true);
    expect(connection?.head.toString()).toBe('sent while mirrored\n');
    expect(connection?.closed?.reason).toBe('fin');
  });

  test('a hostile frame, no secret or a wrong one are refused; the CLI still gets the session', async () => {
    const agent = await startLocalAgent({ netns: sandbox.target });
    const links = linksHeldBy(agent.pid);
    expect(links).toHaveLength(2); // eth0 and lo
    const socket = net.connect(agent.readiness.port, agent.readiness.address);
    const decoder = new FrameDecoder<AgentMessage>(parseAgentMessage, {});
    const received: AgentMessage[] = [];
    socket.on('data', (chunk: Buffer) => received.push(...decoder.push(chunk)));
    // A length prefix of 4 GiB, then garbage.
    socket.write(Buffer.from([0xff, 0xff, 0xff, 0xff, 1, 2, 3]));
    await new Promise((resolve) => socket.once('close', resolve));
    expect(received).toEqual([expect.objectContaining({ type: 'error', code: 'protocol' })]);
    // Whoever found the agent's port first (any local user can see it in /proc/net/tcp).
    for (const secret of ['', 'guessed']) {
      const refused = await connectToAgent(agent.readiness.address, agent.readiness.port, {
        secret,
      }).catch((error: unknown) => error);
      expect(refused).toMatchObject({ code: 'refused', message: /wrong session secret/ });
    }
    const client = await connectToAgent(agent.readiness.address, agent.readiness.port, {
      secret: agent.secret,
    });
    await client.subscribe(PORT);
    await client.close();
    expect(await agent.exited).toBe(0);
    expect(linksAlive(links)).toEqual([]);
  });

  test('every thread of the agent defers to the target (SCHED_BATCH)', async () => {
    session = await MirrorSession.start({ netns: sandbox.target }, [PORT]);
    const pid = session.agent.pid;
    const threads = readdirSync(`/proc/${pid}/task`).map((tid) => {
      const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
      // The fields after the command's closing parenthesis start at field 3; policy is field 41.
      const policy = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[41 - 3]);
      const name = readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim();
      return { name, policy };
    });
    const SCHED_BATCH = 3;
    expect(threads.filter((t) => t.policy !== SCHED_BATCH)).toEqual([]);
  });

  test('a SIGKILLed agent leaves nothing attached', async () => {
    session = await MirrorSession.start({ netns: sandbox.target }, [PORT]);
    const links = linksHeldBy(session.agent.pid);
    expect(links).toHaveLength(2); // eth0 and lo
    process.kill(session.agent.pid, 'SIGKILL');
    await session.agent.exited;
    session = undefined;
    expect(linksAlive(links)).toEqual([]);
    expect(sandbox.run(sandbox.target, 'bpftool', ['net', 'show'])).not.toMatch(/tap/);
  });

  test('SIGTERM detaches everything and ends the session cleanly', async () => {
    session = await MirrorSession.start({ netns: sandbox.target }, [PORT]);
    const current = session;
    const links = linksHeldBy(current.agent.pid);
    expect(links).toHaveLength(2);
    const ended = new Promise<void>((resolve) => current.client.once('end', resolve));
    process.kill(current.agent.pid, 'SIGTERM');
    expect(await current.agent.exited).toBe(0);
    await ended;
    session = undefined;
    expect(linksAlive(links)).toEqual([]);
  });

  test('with no session the agent exits by itself after its idle timeout', async () => {
    const agent = await startLocalAgent({ netns: sandbox.target }, { idleTimeoutSeconds: 1 });
    const links = linksHeldBy(agent.pid);
    expect(links).toHaveLength(2);
    expect(await agent.exited).toBe(1);
    expect(linksAlive(links)).toEqual([]);
  });

  test('bad targets give one clear line and a non-zero exit', () => {
    const cases: [string[], RegExp][] = [
      [['--pid', '999999'], /process 999999 does not exist/],
      [['--netns', 'no-such-netns'], /network namespace "no-such-netns" does not exist/],
      [['--container-id', 'zzz'], /not a container id/],
      [['--container-id', 'containerd://' + 'ab'.repeat(32)], /no process of container/],
      [[], /give one of --container-id, --netns, --pid/],
      [['--netns', 'x', '--idle-timeout', 'soon'], /--idle-timeout "soon" is not a whole number/],
    ];
    for (const [args, message] of cases) {
      const result = runCli(['agent', ...args]);
      expect(result.status).not.toBe(0);
      expect(result.stderr).toMatch(message);
      expect(result.stderr.trim().split('\n')).toHaveLength(1);
    }
    const withoutSecret = runCli(['agent', '--netns', sandbox.target], process.env);
    expect(withoutSecret).toMatchObject({
      status: 2,
      stderr: `mirrord: no session secret: set ${SECRET_ENV}, or give --secret-file PATH\n`,
    });
  });
});
