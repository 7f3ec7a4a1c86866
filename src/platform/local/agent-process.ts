import { execa, type ResultPromise } from 'execa';
import { connect, type Socket } from 'node:net';
import { createInterface } from 'node:readline';
import { join } from 'node:path';
import { packageRoot } from '../../package-root.js';
import type { AgentPlacer } from '../placed-agent.js';
import {
  SECRET_ENV,
  agentErrorOf,
  newSessionSecret,
  readinessOf,
  targetArgs,
  type AgentReadiness,
  type NodeTarget,
} from '../../protocol/agent-launch.js';

export interface LocalAgent {
  readiness: AgentReadiness;
  /** What a session must present (see src/protocol/agent-launch.ts). */
  secret: string;
  pid: number;
  /** Resolves with the exit code when the agent process is gone. */
  exited: Promise<number>;
  /** Asks the agent to detach and exit (SIGTERM), then waits for it. */
  stop(): Promise<number>;
}

export interface LocalAgentOptions {
  idleTimeoutSeconds?: number;
  extraArgs?: string[];
  startTimeoutMs?: number;
}

export class LocalAgentError extends Error {}

/** The agent's own one-line error if it printed one, else the first line of what it printed. */
function reasonOf(stderrLines: string[]): string {
  return agentErrorOf(stderrLines) ?? stderrLines.find(Boolean) ?? 'it printed nothing';
}

/**
 * Starts an agent for a target on this machine as a child process and waits for its readiness
 * line. A child, as in a cluster, rather than a module of the CLI: its BPF links and ring buffer
 * then live exactly as long as it does, and when the CLI is killed the agent notices its session
 * end and detaches by itself.
 */
export async function startLocalAgent(
  target: NodeTarget,
  options: LocalAgentOptions = {},
): Promise<LocalAgent> {
  const secret = newSessionSecret();
  const child: ResultPromise = execa(
    process.execPath,
    [
      // A small young generation and no GC helper threads keep the agent's RSS low and spare
      // the target the helpers' wakeups (see the README's agent section).
      '--single-threaded-gc',
      '--max-semi-space-size=2',
      // The CLI entry point: the agent is its hidden `agent` command, run by the same Node.
      join(packageRoot(), 'bin', 'run.js'),
      'agent',
      ...targetArgs(target),
      '--idle-timeout',
      String(options.idleTimeoutSeconds ?? 30),
      ...(options.extraArgs ?? []),
    ],
    {
      reject: false,
      stdin: 'ignore',
      stdout: 'pipe',
      stderr: 'pipe',
      buffer: { stdout: false },
      env: { [SECRET_ENV]: secret },
    },
  );
  const stderrLines: string[] = [];
  createInterface({ input: child.stderr! }).on('line', (line) => {
    stderrLines.push(line);
    if (stderrLines.length > 20) stderrLines.shift();
  });
  const exited = child.then((result) => result.exitCode ?? 1);

  const readiness = await new Promise<AgentReadiness>((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new LocalAgentError('the agent did not become ready within its start timeout'));
    }, options.startTimeoutMs ?? 15_000);
    const lines = createInterface({ input: child.stdout! });
    lines.on('line', (line) => {
      const parsed = readinessOf(line);
      if (parsed) {
        clearTimeout(timer);
        resolve(parsed);
      }
    });
    void exited.then(() => {
      clearTimeout(timer);
      reject(new LocalAgentError(`the agent exited before it was ready: ${reasonOf(stderrLines)}`));
    });
  });

  return {
    readiness,
    secret,
    pid: child.pid!,
    exited,
    async stop() {
      child.kill('SIGTERM');
      return exited;
    },
  };
}

/** The local platform's placer: an agent child process, reached over loopback TCP. */
export function placeLocalAgent(target: NodeTarget, options: LocalAgentOptions = {}): AgentPlacer {
  // A local agent is ready in well under a second: no progress to report.
  return async () => {
    const agent = await startLocalAgent(target, options);
    return {
      target: agent.readiness.target,
      replaceable: false,
      secret: agent.secret,
      connect: () => openTcp(agent.readiness.address, agent.readiness.port),
      async stop() {
        await agent.stop();
      },
    };
  };
}

function openTcp(host: string, port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host, port });
    socket.once('error', (error) =>
      reject(
        new LocalAgentError(`cannot connect to the agent at ${host}:${port}: ${error.message}`),
      ),
    );
    socket.once('connect', () => {
      socket.removeAllListeners('error');
      resolve(socket);
    });
  });
}
