import { createHash, type Hash } from 'node:crypto';
import { connectToAgent, type AgentClient } from '../../src/protocol/client.js';
import type { ClosedMessage, CountersMessage, OpenedMessage } from '../../src/protocol/messages.js';
import { startLocalAgent, type LocalAgent } from '../../src/platform/local/agent-process.js';
import type { NodeTarget } from '../../src/protocol/agent-launch.js';

/** What a session received for one mirrored connection. */
export interface MirroredConnection {
  opened: OpenedMessage;
  bytes: number;
  digest: Hash;
  /** The first bytes, kept for assertions on content. */
  head: Buffer;
  closed?: ClosedMessage;
}

const HEAD_BYTES = 64 * 1024;

/**
 * A real agent (child process, as `mirrord mirror` starts it) and a session with it that
 * records every mirrored connection: its digest, its byte count and how it closed.
 */
export class MirrorSession {
  readonly connections = new Map<number, MirroredConnection>();
  private waiters: (() => void)[] = [];

  private constructor(
    readonly agent: LocalAgent,
    readonly client: AgentClient,
  ) {
    client.on('opened', (opened) => {
      this.connections.set(opened.id, {
        opened,
        bytes: 0,
        digest: createHash('sha256'),
        head: Buffer.alloc(0),
      });
      this.notify();
    });
    client.on('data', ({ id, bytes }) => {
      const connection = this.connections.get(id);
      if (!connection) throw new Error(`data for unknown connection ${id}`);
      connection.bytes += bytes.length;
      connection.digest.update(bytes);
      if (connection.head.length < HEAD_BYTES) {
        connection.head = Buffer.concat([connection.head, bytes]).subarray(0, HEAD_BYTES);
      }
    });
    client.on('closed', (closed) => {
      const connection = this.connections.get(closed.id);
      if (connection) connection.closed = closed;
      this.notify();
    });
    client.on('error', () => this.notify());
    client.on('end', () => this.notify());
  }

  static async start(
    target: NodeTarget,
    ports: number[],
    agentArgs: string[] = [],
  ): Promise<MirrorSession> {
    const agent = await startLocalAgent(target, { extraArgs: agentArgs });
    try {
      const client = await connectToAgent(agent.readiness.address, agent.readiness.port, {
        clientName: 'mirrord tests',
        secret: agent.secret,
      });
      const session = new MirrorSession(agent, client);
      for (const port of ports) await client.subscribe(port);
      return session;
    } catch (error) {
      await agent.stop();
      throw error;
    }
  }

  private notify(): void {
    for (const waiter of this.waiters.splice(0)) waiter();
  }

  /** Resolves when `done()` holds, re-checked on every opened/closed event. */
  async until(done: () => boolean, what: string, timeoutMs = 60_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!done()) {
      const remaining = deadline - Date.now();
      if (remaining <= 0) throw new Error(`timed out waiting for ${what}`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.min(remaining, 500));
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  /** The next counters the agent sends (it sends them every second). */
  nextCounters(): Promise<CountersMessage> {
    return new Promise((resolve) => this.client.once('counters', resolve));
  }

  closedConnections(): MirroredConnection[] {
    return [...this.connections.values()].filter((c) => c.closed);
  }

  async stop(): Promise<void> {
    await this.client.close();
    await this.agent.stop();
  }
}
