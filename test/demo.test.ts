/** `mirrord demo`, as a user runs it: the real CLI, its sandbox, its agent, its cleanup. */
import { spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { listNetns } from '../src/platform/local/netns.js';

const CLI = join(dirname(fileURLToPath(import.meta.url)), '..', 'bin', 'run.js');

function runDemo(
  args: string[],
  interruptAfter?: RegExp,
): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, 'demo', ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
    const collect = (chunk: Buffer): void => {
      out += chunk.toString();
      if (interruptAfter?.test(out)) {
        interruptAfter = undefined;
        child.kill('SIGINT');
      }
    };
    child.stdout.on('data', collect);
    child.stderr.on('data', collect);
    child.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, out });
    });
  });
}

describe('mirrord demo', () => {
  test('mirrors the sandbox service for a few seconds and removes everything', async () => {
    const { code, out } = await runDemo(['--duration', '4']);
    expect(code).toBe(0);
    expect(out).toMatch(/mirrored on \d+: POST \/orders HTTP\/1\.1 {2}\{"item":/);
    expect(out).toMatch(/removed the sandbox/);
    expect(listNetns('mirrord-demo')).toEqual([]);
  });

  test('Ctrl-C ends it cleanly', async () => {
    const { code, out } = await runDemo(['--duration', '0'], /mirrored on/);
    expect(code).toBe(0);
    expect(out).toMatch(/removed the sandbox/);
    expect(listNetns('mirrord-demo')).toEqual([]);
  });
});
