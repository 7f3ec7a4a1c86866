/**
 * Only the CLI that placed an agent holds its session secret: another user of this machine
 * cannot read it from any process of a running session (environment, command line) nor from a
 * file. The real CLI, agent and app, looked at as `nobody` with setpriv.
 */
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { SECRET_ENV } from '../src/protocol/agent-launch.js';
import {
  agentsOf,
  killRun,
  mirrord,
  untilWhileRunning,
  type MirrorRun,
} from './support/mirror-cli.js';
import { descendants } from './support/processes.js';
import { createSandbox, type Sandbox } from './support/sandbox.js';

const PORT = 7500;

/** Runs `script` with bash as nobody, without root's groups or capabilities. */
function asNobody(script: string): { status: number | null; stdout: string } {
  const result = spawnSync(
    'setpriv',
    ['--reuid=nobody', '--regid=nogroup', '--clear-groups', '--', 'bash', '-c', script],
    { encoding: 'utf8' },
  );
  return { status: result.status, stdout: result.stdout };
}

describe('the session secret', () => {
  let sandbox: Sandbox;
  let run: MirrorRun | undefined;

  beforeEach(() => {
    sandbox = createSandbox('secret');
  });

  afterEach(async () => {
    if (run) await killRun(run);
    sandbox.destroy();
  });

  test('another user cannot read it from the session’s processes or from files', async () => {
    const app = `require('net').createServer().listen(${PORT}); setInterval(() => {}, 1000);`;
    const session = mirrord([
      '--netns',
      sandbox.target,
      '--json',
      '--',
      process.execPath,
      '-e',
      app,
    ]);
    run = session;
    await untilWhileRunning(
      session,
      () => session.events().some((e) => e.event === 'listen' && e.port === PORT),
      'the app to listen',
    );
    const [agent] = agentsOf(sandbox.target).map(Number);
    expect(agent).toBeDefined();
    // Root can: that is where the agent has it from.
    const environ = readFileSync(`/proc/${agent}/environ`, 'utf8').split('\0');
    const secret = environ
      .find((v) => v.startsWith(`${SECRET_ENV}=`))
      ?.slice(SECRET_ENV.length + 1);
    expect(secret).toMatch(/^[A-Za-z0-9_-]{43}$/);

    const pids = [session.child.pid!, ...descendants(session.child.pid!).keys()];
    expect(pids.length).toBeGreaterThanOrEqual(4); // the CLI, its agent, the guard, the app
    for (const pid of pids) {
      // Their environments are closed to other users; their command lines are open to all,
      // and must not hold it.
      expect(asNobody(`cat /proc/${pid}/environ`).status).not.toBe(0);
      const cmdline = asNobody(`tr '\\0' ' ' < /proc/${pid}/cmdline`);
      expect(cmdline.status).toBe(0);
      expect(cmdline.stdout).not.toContain(secret);
    }
    // Nor is it in a file another user can read.
    const found = asNobody(
      `grep -rlsF --exclude-dir=node_modules -- '${secret}' /tmp /var/tmp /dev/shm /run ${process.cwd()} 2>/dev/null; true`,
    );
    expect(found.stdout).toBe('');
    // The check itself can see: the agent's command line is readable and names its target.
    expect(asNobody(`tr '\\0' ' ' < /proc/${agent}/cmdline`).stdout).toContain(sandbox.target);
  });
});
