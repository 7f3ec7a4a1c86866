/**
 * People extend the CLI with oclif plugins: `mirrord plugins link` (and `install`) add
 * commands. A minimal plugin from test/fixtures is linked into a throwaway data directory.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stripVTControlCharacters } from 'node:util';
import { CLI, FIXTURES } from './support/mirror-cli.js';

describe('oclif plugins', () => {
  let home: string;

  beforeEach(() => {
    home = mkdtempSync(join(tmpdir(), 'mirrord-test-plugins-'));
  });

  afterEach(() => {
    rmSync(home, { recursive: true, force: true });
  });

  /** The CLI with its plugin data under `home`, not the user's. */
  function cli(...args: string[]): { status: number | null; stdout: string } {
    const result = spawnSync(process.execPath, [CLI, ...args], {
      encoding: 'utf8',
      env: { ...process.env, HOME: home, XDG_DATA_HOME: join(home, 'data') },
      timeout: 60_000,
    });
    // Colours (CI turns them on) are not what is checked.
    return { status: result.status, stdout: stripVTControlCharacters(result.stdout) };
  }

  test('a linked plugin adds its command, and unlinking removes it', () => {
    expect(cli('plugins').stdout).toContain('No plugins installed.');
    expect(cli('hello').status).not.toBe(0);

    const plugin = join(FIXTURES, 'hello-plugin');
    expect(cli('plugins', 'link', plugin, '--no-install').status).toBe(0);
    expect(cli('plugins').stdout).toContain('mirrord-plugin-hello 1.0.0 (link)');
    expect(cli('hello', '--name', 'staging')).toEqual({
      status: 0,
      stdout: 'hello, staging, from a plugin\n',
    });

    expect(cli('plugins', 'unlink', 'mirrord-plugin-hello').status).toBe(0);
    expect(cli('hello').status).not.toBe(0);
  });
});
