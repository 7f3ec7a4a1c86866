/**
 * An agent running in the test's own process (startAgent), handed to a session as a platform
 * hands its agents (src/platform/placed-agent.ts): for tests that reach into the agent, or that
 * place agents a platform on this machine would not (a replaceable one).
 */
import { connect, type Socket } from 'node:net';
import type { RunningAgent } from '../../src/agent/server.js';
import type { PlacedAgent } from '../../src/platform/placed-agent.js';

export function placedInProcess(
  agent: RunningAgent,
  secret: string,
  replaceable = false,
): PlacedAgent {
  return {
    target: agent.readiness.target,
    replaceable,
    secret,
    connect: () =>
      new Promise<Socket>((resolve) => {
        const socket = connect(agent.readiness.port, '127.0.0.1', () => resolve(socket));
      }),
    stop: async () => {
      agent.stop();
      await agent.done;
    },
  };
}
