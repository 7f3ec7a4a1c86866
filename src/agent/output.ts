import type { AgentReadiness } from './server.js';

/**
 * What a launcher reads from the agent's output, wherever the agent runs (a child process here,
 * a Job's pod log in a cluster): its readiness line, and the one-line error it prints when it
 * cannot start (see src/cli/base-command.ts).
 */
export function readinessOf(line: string): AgentReadiness | undefined {
  if (!line.startsWith('{')) return undefined;
  try {
    const parsed = JSON.parse(line) as AgentReadiness;
    return parsed.ready === true ? parsed : undefined;
  } catch {
    return undefined;
  }
}

/** The agent's own error line among what it printed, without the `mirrord: ` prefix. */
export function agentErrorOf(lines: string[]): string | undefined {
  return lines.findLast((line) => line.startsWith('mirrord: '))?.slice('mirrord: '.length);
}
