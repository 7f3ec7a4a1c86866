import { execa } from 'execa';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { cpus } from 'node:os';
import { fileURLToPath } from 'node:url';
import { startLocalAgent, type LocalAgent } from '../src/platform/local/agent-process.js';
import { createHosts, waitForTcp, type Hosts } from '../src/platform/local/netns.js';
import { monotonicMicros } from '../src/protocol/clock.js';
import { encodeFrame, FrameDecoder } from '../src/protocol/framing.js';
import {
  PROTOCOL_VERSION,
  clientMessageToWire,
  parseAgentMessage,
  type AgentMessage,
  type Counters,
} from '../src/protocol/messages.js';
import { NODE_CPU, onCpu, pin } from './node-model.js';
import { waitFor } from '../test/support/wait.js';

/** Where the load generator sends its warm-up requests; the stamping server does not note them. */
export const WARMUP_PATH = '/warmup';

export function progress(line: string): void {
  process.stderr.write(`${line}\n`);
}

/** This machine as a benchmark names it: its vCPUs and their model. */
export function machineName(): string {
  return `${cpus().length}-vCPU ${cpus()[0]?.model.trim() ?? 'unknown CPU'}`;
}

export type BenchHosts = Hosts;

/** A target ("server") netns and a client netns, 10.213.250.0/24; Ctrl-C removes them. */
export function createBenchHosts(): BenchHosts {
  const hosts = createHosts('mirrord-bench', 'hosts', {
    serverAddress: '10.213.250.1',
    clientAddress: '10.213.250.2',
  });
  process.once('SIGINT', () => {
    hosts.destroy();
    process.exit(130);
  });
  return hosts;
}

/** The demo's HTTP service, compiled beside the benchmarks. */
export const HTTP_SERVICE = fileURLToPath(new URL('../src/demo/service.js', import.meta.url));

/** The demo's HTTP service as the target, on the node's CPU. */
export async function startHttpTarget(hosts: BenchHosts, port: number): Promise<void> {
  hosts.spawn(
    hosts.server,
    ...onCpu(NODE_CPU, process.execPath, [HTTP_SERVICE, hosts.serverAddress, String(port)]),
  );
  await waitForTcp(hosts.client, hosts.serverAddress, port);
}

/** What wrk reached against `url` from the client netns (on this process's CPU). */
export async function wrk(
  hosts: BenchHosts,
  url: string,
  seconds: number,
  connections: number,
): Promise<{ requestsPerSecond: number; requests: number }> {
  const result = await hosts.spawn(hosts.client, 'wrk', [
    '-t1',
    `-c${connections}`,
    `-d${seconds}s`,
    url,
  ]);
  const rate = /Requests\/sec:\s+([\d.]+)/.exec(String(result.stdout));
  const total = /(\d+) requests in/.exec(String(result.stdout));
  if (!rate || !total) {
    throw new Error(`wrk printed no rate: ${String(result.stderr || result.stdout)}`);
  }
  return { requestsPerSecond: Number(rate[1]), requests: Number(total[1]) };
}

/**
 * Highest resident set size of a process (the kernel's high-water mark, VmHWM, so no peak
 * between samples is missed), sampled until stop() is called: the process may be gone by then.
 */
export function sampleRss(pid: number, intervalMs = 250): { stop(): number } {
  let maxKiB = 0;
  const sample = (): void => {
    try {
      const match = /VmHWM:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
      if (match) maxKiB = Math.max(maxKiB, Number(match[1]));
    } catch {
      // The process is gone.
    }
  };
  sample();
  const timer = setInterval(sample, intervalMs);
  return {
    stop() {
      clearInterval(timer);
      sample();
      return maxKiB / 1024;
    },
  };
}

/** The value at quantile `q` of ascending `sorted` (nearest rank); NaN when it is empty. */
export function percentile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))] ?? NaN;
}

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

export function round(value: number, digits = 3): number {
  return Number(value.toFixed(digits));
}

export interface Tcpdump {
  /** tcpdump's own process (under `ip netns exec` and taskset, which exec it). */
  pid: number;
  stop(): Promise<void>;
  stats(): Promise<{ captured: number; dropped: number }>;
}

/**
 * tcpdump writing what the tap would copy (packets to `port`) to /dev/null in the target's netns,
 * on the node's CPU: the peer the tap is compared with. stats() stops it and says what it
 * captured and what the kernel dropped for it.
 */
export async function startTcpdump(hosts: BenchHosts, port: number): Promise<Tcpdump> {
  const [taskset, pinned] = onCpu(NODE_CPU, 'tcpdump', [
    '-i',
    'eth0',
    '-s',
    '0',
    '-w',
    '/dev/null',
    `tcp dst port ${port}`,
  ]);
  const child = execa('ip', ['netns', 'exec', hosts.server, taskset, ...pinned], {
    reject: false,
    stdin: 'ignore',
  });
  // tcpdump says "listening on" once its socket is bound.
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  await waitFor(
    'tcpdump to start capturing',
    () => {
      if (child.exitCode !== null) throw new Error(`tcpdump exited: ${stderr.trim()}`);
      return stderr.includes('listening on');
    },
    { ms: 10_000 },
  );
  const finished = (async () => {
    const result = await child;
    const text = String(result.stderr);
    const number = (label: string): number =>
      Number(new RegExp(`(\\d+) packets? ${label}`).exec(text)?.[1] ?? NaN);
    return { captured: number('captured'), dropped: number('dropped by kernel') };
  })();
  return {
    pid: child.pid!,
    async stop() {
      child.kill('SIGINT');
      await finished;
    },
    stats: () => {
      child.kill('SIGINT');
      return finished;
    },
  };
}

/** How a connection of a session ended, and the payload bytes it carried. */
export interface CountedConnection {
  bytes: number;
  reason: string;
  gapBytes: number;
}

/**
 * Follows a session's decoded messages: each connection's payload bytes until it closes, and
 * the agent's counters, for the sessions of the benchmarks (whichever reader decodes them).
 */
export class SessionTally {
  readonly #bytes = new Map<number, number>();
  readonly #closing: ((connection: CountedConnection) => void)[] = [];
  #counters: Counters | undefined;
  #countersSeen = 0;

  take(message: AgentMessage): void {
    if (message.type === 'data') {
      this.#bytes.set(message.id, (this.#bytes.get(message.id) ?? 0) + message.bytes.length);
    } else if (message.type === 'closed') {
      const bytes = this.#bytes.get(message.id) ?? 0;
      this.#bytes.delete(message.id);
      this.#closing.shift()?.({ bytes, reason: message.reason, gapBytes: message.gapBytes });
    } else if (message.type === 'counters') {
      this.#counters = message;
      this.#countersSeen += 1;
    }
  }

  /** The next connection to close. */
  nextClosed(): Promise<CountedConnection> {
    return new Promise((resolve) => this.#closing.push(resolve));
  }

  /** The first counters the agent sends after this call (it sends them every second). */
  nextCounters(): Promise<Counters> {
    const before = this.#countersSeen;
    return waitFor(
      "the agent's next counters",
      () => this.#countersSeen > before && this.#counters,
      { ms: 5_000 },
    );
  }
}

/** An agent on the node's CPU serving a session that only counts what it receives. */
export interface CountingSession {
  agent: LocalAgent;
  /** Bytes received from the agent so far. */
  bytes(): number;
  /**
   * With `decode`: for each data message received, the time from the tap's stamp to its
   * arrival here (ms; one machine, one clock), the node's part of the mirror's lag. Emptied to
   * start a window.
   */
  lags: number[];
  /** With `decode`: the next connection to close. */
  nextClosed(): Promise<CountedConnection>;
  /** The first counters the agent sends after this call (it sends them every second). */
  nextCounters(): Promise<Counters>;
  stop(): Promise<void>;
}

/** What the counting session reads into, again and again. */
const READ_BUFFER_BYTES = 1024 * 1024;

/**
 * A session whose frames are read and counted but not decoded: in production the CLI runs on the
 * developer's machine, at the far end of a port-forward, so only the agent's work (and not the
 * CLI's decoding) is charged to the target's machine here. With `decode`, it decodes every frame
 * (the data messages' stamps, each connection's bytes and end), at the price of that decoding on
 * the laptop's CPU. It reads into one reused buffer and keeps no payload, so unlike the CLI's
 * client it allocates nothing per read: it stands for a reader that keeps up (see the README's
 * stream figures).
 */
export async function startCountingSession(
  hosts: BenchHosts,
  port: number,
  { decode = false }: { decode?: boolean } = {},
): Promise<CountingSession> {
  const agent = await startLocalAgent({ netns: hosts.server });
  await pin(agent.pid, NODE_CPU);
  let received = 0;
  let subscribed = false;
  const lags: number[] = [];
  const tally = new SessionTally();
  const decoder = new FrameDecoder<AgentMessage>(parseAgentMessage, {});
  const onChunk = (chunk: Buffer): void => {
    received += chunk.length;
    // Decoded until the subscription is acknowledged; after that only counted, or with
    // `decode` decoded (payloads are views into the read buffer, counted and let go).
    if (subscribed && !decode) return;
    const now = monotonicMicros();
    for (const message of decoder.push(chunk)) {
      if (message.type === 'subscribed') subscribed = true;
      else if (message.type === 'data') lags.push((now - message.tapMicros) / 1000);
      tally.take(message);
    }
  };
  const readBuffer = Buffer.allocUnsafe(READ_BUFFER_BYTES);
  const socket = net.connect({
    port: agent.readiness.port,
    host: agent.readiness.address,
    onread: {
      buffer: readBuffer,
      callback: (length) => {
        onChunk(readBuffer.subarray(0, length));
        return true;
      },
    },
  });
  await once(socket, 'connect');
  socket.write(
    encodeFrame([
      clientMessageToWire({
        type: 'hello',
        version: PROTOCOL_VERSION,
        capabilities: [],
        client: 'bench',
        secret: agent.secret,
      }),
      clientMessageToWire({ type: 'subscribe', port }),
    ]),
  );
  // Acknowledged once the tap copies the port.
  await waitFor('the agent to acknowledge the subscription', () => subscribed, { ms: 10_000 });
  return {
    agent,
    bytes: () => received,
    lags,
    nextClosed: () => tally.nextClosed(),
    nextCounters: () => tally.nextCounters(),
    async stop() {
      socket.destroy();
      await agent.stop();
    },
  };
}
