/**
 * The target's environment in the local app (`mirror`) and on stdout (`env`), as a user runs
 * them: the real CLI and agent, a target process in a sandbox netns started with its own
 * environment, and real programs reading theirs (node, python3, a POSIX shell).
 */
import { execFile } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { CLI, agentsOf, mirrord, tempDir } from './support/mirror-cli.js';
import { createSandbox, type Sandbox } from './support/sandbox.js';

const run = promisify(execFile);

/** What the target process started with: a pod's environment as a container runtime sets it. */
const TARGET_ENV = {
  PATH: '/usr/sbin:/usr/bin:/sbin:/bin',
  HOME: '/srv/api',
  HOSTNAME: 'api-7f9',
  LANG: 'C',
  DATABASE_URL: 'postgres://db.staging:5432/api',
  DB_POOL: '12',
  SECRET_TOKEN: "it's s3cr=t",
  MULTILINE: 'line one\nline two',
  EMPTY: '',
  UNICODE: 'Grüße, 世界',
};

/** Runs `mirrord ARGS` to its end; its exit code and output. */
async function cli(
  args: string[],
  cwd?: string,
): Promise<{ code: number; out: string; err: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, [CLI, ...args], { cwd });
    return { code: 0, out: stdout, err: stderr };
  } catch (error) {
    const failed = error as { code: number; stdout: string; stderr: string };
    return { code: failed.code, out: failed.stdout, err: failed.stderr };
  }
}

describe("the target's environment", () => {
  let sandbox: Sandbox;
  let targetPid: number;
  const dir = tempDir('env');

  beforeAll(() => {
    sandbox = createSandbox('env');
    const target = sandbox.spawn(sandbox.target, 'sleep', ['600'], { env: TARGET_ENV });
    targetPid = target.pid!;
  });

  afterAll(() => {
    sandbox.destroy();
    dir.remove();
  });

  /** Mirrors the target into `program ARGS`, which writes its environment to a file; the file's text. */
  async function appEnvironment(flags: string[], app: (file: string) => string[]): Promise<string> {
    const file = join(dir.path, `env-${Math.random().toString(36).slice(2)}`);
    const session = mirrord(['--pid', String(targetPid), ...flags, '--', ...app(file)]);
    const code = await session.exited;
    expect({ code, output: session.output() }).toMatchObject({ code: 0 });
    expect(agentsOf(`pid ${targetPid}`)).toEqual([]);
    return readFileSync(file, 'utf8');
  }

  const nodeApp = (file: string) => [
    process.execPath,
    '-e',
    `require('fs').writeFileSync(${JSON.stringify(file)}, JSON.stringify(process.env))`,
  ];

  test('node gets every target variable but the machine’s own, values byte-exact', async () => {
    const env = JSON.parse(await appEnvironment([], nodeApp)) as Record<string, string>;
    expect(env).toMatchObject({
      DATABASE_URL: TARGET_ENV.DATABASE_URL,
      DB_POOL: '12',
      SECRET_TOKEN: TARGET_ENV.SECRET_TOKEN,
      MULTILINE: TARGET_ENV.MULTILINE,
      EMPTY: '',
      UNICODE: TARGET_ENV.UNICODE,
    });
    // This machine's own stay local: the app still finds its runtime and its home.
    expect(env.PATH).toBe(process.env.PATH);
    expect(env.HOME).toBe(process.env.HOME);
    expect(env.HOSTNAME).not.toBe('api-7f9');
    expect(env.LANG).toBe(process.env.LANG);
    expect(env.LD_PRELOAD).toMatch(/mirrord_layer\.so/);
  });

  test('python3 and a shell see the same; include, exclude and override select', async () => {
    const python = await appEnvironment(
      ['--env-include', 'D*', '--env-include', 'SECRET_*', '--env-exclude', 'DB_*'],
      (file) => [
        'python3',
        '-c',
        `import json, os; open(${JSON.stringify(file)}, "w").write(json.dumps(dict(os.environ)))`,
      ],
    );
    const env = JSON.parse(python) as Record<string, string>;
    expect(env.DATABASE_URL).toBe(TARGET_ENV.DATABASE_URL);
    expect(env.SECRET_TOKEN).toBe(TARGET_ENV.SECRET_TOKEN);
    expect(env.DB_POOL).toBeUndefined();
    expect(env.UNICODE).toBeUndefined();

    const shell = await appEnvironment(
      ['--env-override', 'DATABASE_URL=postgres://localhost/dev', '--env-override', 'NEW=1'],
      (file) => ['sh', '-c', `printf '%s|%s|%s' "$DATABASE_URL" "$NEW" "$DB_POOL" > ${file}`],
    );
    expect(shell).toBe('postgres://localhost/dev|1|12');
  });

  test('--no-env and mirrord.json', async () => {
    const none = JSON.parse(await appEnvironment(['--no-env'], nodeApp)) as Record<string, string>;
    expect(none.DATABASE_URL).toBeUndefined();
    const cwd = join(dir.path, 'project');
    await run('mkdir', ['-p', cwd]);
    writeFileSync(
      join(cwd, 'mirrord.json'),
      JSON.stringify({ envIncludes: ['DB_*'], envOverrides: ['MODE=mirrored'] }),
    );
    const file = join(dir.path, 'from-config');
    const session = mirrord(['--pid', String(targetPid), '--', ...nodeApp(file)], { cwd });
    expect(await session.exited).toBe(0);
    const env = JSON.parse(readFileSync(file, 'utf8')) as Record<string, string>;
    expect(env).toMatchObject({ DB_POOL: '12', MODE: 'mirrored' });
    expect(env.DATABASE_URL).toBeUndefined();
    expect(session.output()).toMatch(/the app gets 1 variable from pid \d+ \(DB_POOL\)/);
  });

  test('`mirrord env` prints what the app would get, as lines, JSON and shell exports', async () => {
    const json = await cli(['env', '--pid', String(targetPid), '--json']);
    expect(json.code).toBe(0);
    const env = JSON.parse(json.out) as Record<string, string>;
    expect(env).toMatchObject({ DATABASE_URL: TARGET_ENV.DATABASE_URL, PATH: process.env.PATH });
    expect(Object.keys(env)).toEqual(Object.keys(env).sort());

    const lines = await cli(['env', '--pid', String(targetPid), '--env-include', 'DB_*']);
    expect(lines.out).toContain('DB_POOL=12\n');
    expect(lines.out).not.toContain('DATABASE_URL=');

    // What eval makes of the exports is the target's value, quotes and newlines included.
    const script = `eval "$("${process.execPath}" "${CLI}" env --pid ${targetPid} --export)"; printf '%s|%s|%s' "$SECRET_TOKEN" "$MULTILINE" "$UNICODE"`;
    const { stdout } = await run('bash', ['-c', script]);
    expect(stdout).toBe(`${TARGET_ENV.SECRET_TOKEN}|${TARGET_ENV.MULTILINE}|${TARGET_ENV.UNICODE}`);
    expect(agentsOf(`pid ${targetPid}`)).toEqual([]);
  });

  test('a target without a process, or with none left, gets a one-line error and leaves nothing', async () => {
    const netns = await cli(['env', '--netns', sandbox.target]);
    expect(netns).toMatchObject({ code: 2, out: '' });
    expect(netns.err).toMatch(
      /^mirrord: network namespace ".*" has no process and so no environment: give --pid/,
    );
    expect(netns.err.trim().split('\n')).toHaveLength(1);

    const asked = await cli([
      'mirror',
      '--netns',
      sandbox.target,
      '--env-include',
      'A',
      '--',
      'true',
    ]);
    expect(asked.code).toBe(2);
    expect(asked.err).toMatch(/the target's environment needs a target with a process/);

    const bad = await cli(['env', '--pid', String(targetPid), '--env-override', '=x']);
    expect(bad.code).toBe(2);
    expect(bad.err).toMatch(/--env-override "=x" is not NAME=VALUE/);

    const gone = await cli(['env', '--pid', '999999']);
    expect(gone.code).toBe(1);
    expect(gone.err.trim().split('\n')).toHaveLength(1);
    expect(gone.err).toMatch(/process 999999 does not exist/);
  });
});
