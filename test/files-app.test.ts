/**
 * The target's files in the mirrored app, as a user runs it: `mirrord mirror --pid` into real
 * runtimes (node's fs in its sync, promise and stream forms, python3's open and os, a C
 * program's fopen/fgets, cat), against a target chrooted in a mount namespace of its own whose
 * files only it has. The app reads the target's paths from the target, byte for byte, and its
 * own (working directory, /tmp, its runtime) locally.
 */
import { execFileSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { agentsOf, mirrord, tempDir } from './support/mirror-cli.js';
import { startChrootedTarget } from './support/chrooted-target.js';

const BIG_BYTES = 100 * 1024 * 1024;
const CONF = 'listen = 8080\nregion = "eu-1"\n';

describe("the target's files in the app", () => {
  const dir = tempDir('files-app');
  const root = join(dir.path, 'root');
  let target: ChildProcess;
  let bigSha = '';

  beforeAll(async () => {
    for (const sub of ['usr', 'etc', 'app/sub', 'data', 'secrets', 'proc']) {
      mkdirSync(join(root, sub), { recursive: true });
    }
    writeFileSync(join(root, 'etc/app.conf'), CONF);
    writeFileSync(join(root, 'app/config.json'), '{"feature": true}');
    symlinkSync('/etc/app.conf', join(root, 'app/absolute'));
    symlinkSync('/proc/self/root/etc/hostname', join(root, 'app/through-proc'));
    execFileSync('bash', [
      '-c',
      `head -c ${BIG_BYTES} /dev/urandom > ${join(root, 'data/big.bin')}`,
    ]);
    bigSha = createHash('sha256')
      .update(readFileSync(join(root, 'data/big.bin')))
      .digest('hex');
    // /proc bound in, and a tmpfs that only this mount namespace has.
    target = await startChrootedTarget(root, [
      `mount --rbind /proc ${root}/proc`,
      `mount -t tmpfs secrets ${root}/secrets`,
      `printf 's3cr=t\\n' > ${root}/secrets/token`,
    ]);
  }, 60_000);

  afterAll(() => {
    target?.kill('SIGKILL');
    dir.remove();
  });

  /** Runs `app` mirrored from the target; what it printed. */
  async function inApp(app: string[], flags: string[] = []): Promise<string> {
    const run = mirrord(['--pid', String(target.pid), ...flags, '--', ...app]);
    const code = await run.exited;
    expect({ code, output: run.output() }).toMatchObject({ code: 0 });
    expect(agentsOf(`pid ${target.pid}`)).toEqual([]);
    return run.stdout();
  }

  test('node: readFileSync, fs.promises, streams, stat, readlink, errors; its own files stay local', async () => {
    const local = join(dir.path, 'local.txt');
    writeFileSync(local, 'this machine');
    const program = `
      const fs = require('fs');
      const crypto = require('crypto');
      (async () => {
        const out = {};
        out.conf = fs.readFileSync('/etc/app.conf', 'utf8');
        out.config = await fs.promises.readFile('/app/config.json', 'utf8');
        out.token = await new Promise((resolve, reject) => {
          let text = '';
          fs.createReadStream('/secrets/token', 'utf8').on('data', (c) => (text += c)).on('end', () => resolve(text)).on('error', reject);
        });
        const stat = fs.statSync('/app/config.json');
        out.stat = { size: stat.size, mode: stat.mode, isFile: stat.isFile() };
        out.lstatIsLink = fs.lstatSync('/app/absolute').isSymbolicLink();
        out.link = fs.readlinkSync('/app/absolute');
        out.viaLink = fs.readFileSync('/app/absolute', 'utf8');
        out.climbing = fs.readFileSync('/app/../../../etc/app.conf', 'utf8');
        out.exists = [fs.existsSync('/etc/app.conf'), fs.existsSync('/nowhere')];
        for (const [name, path] of [['missing', '/nowhere'], ['escape', '/app/through-proc']]) {
          try { fs.readFileSync(path); out[name] = 'read'; } catch (e) { out[name] = e.code; }
        }
        out.listing = fs.readdirSync('/app').sort();
        out.kinds = fs.readdirSync('/app', { withFileTypes: true }).map((e) => e.name + ':' + (e.isFile() ? 'f' : e.isDirectory() ? 'd' : e.isSymbolicLink() ? 'l' : 'o')).sort();
        out.opendir = [];
        for await (const entry of await fs.promises.opendir('/secrets')) out.opendir.push(entry.name);
        out.bigSha = crypto.createHash('sha256').update(fs.readFileSync('/data/big.bin')).digest('hex');
        out.local = fs.readFileSync(${JSON.stringify(local)}, 'utf8');
        console.log(JSON.stringify(out));
      })();`;
    const out = JSON.parse(await inApp([process.execPath, '-e', program])) as Record<
      string,
      unknown
    >;
    expect(out).toEqual({
      conf: CONF,
      config: '{"feature": true}',
      token: 's3cr=t\n',
      stat: { size: 17, mode: 0o100644, isFile: true },
      lstatIsLink: true,
      link: '/etc/app.conf',
      viaLink: CONF,
      climbing: CONF,
      exists: [true, false],
      missing: 'ENOENT',
      escape: 'EACCES',
      listing: ['absolute', 'config.json', 'sub', 'through-proc'],
      kinds: ['absolute:l', 'config.json:f', 'sub:d', 'through-proc:l'],
      opendir: ['token'],
      bigSha,
      local: 'this machine',
    });
  }, 120_000);

  test('python3: open, os.stat, os.path, errors', async () => {
    const program = [
      'import json, os',
      'out = {"conf": open("/etc/app.conf").read(), "token": open("/secrets/token", "rb").read().decode()}',
      'out["size"] = os.stat("/app/config.json").st_size',
      'out["listdir"] = sorted(os.listdir("/app"))',
      'out["scandir"] = sorted(e.name for e in os.scandir("/secrets") if e.is_file())',
      'out["exists"] = [os.path.exists("/etc/app.conf"), os.path.isfile("/app/config.json"), os.path.exists("/nowhere")]',
      'try:\n    open("/nowhere")\nexcept OSError as e:\n    out["missing"] = e.errno',
      'print(json.dumps(out))',
    ].join('\n');
    const out = JSON.parse(await inApp(['/usr/bin/python3', '-c', program])) as Record<
      string,
      unknown
    >;
    expect(out).toEqual({
      conf: CONF,
      token: 's3cr=t\n',
      size: 17,
      listdir: ['absolute', 'config.json', 'sub', 'through-proc'],
      scandir: ['token'],
      exists: [true, true, false],
      missing: 2,
    });
  }, 60_000);

  test('a C program (fopen, fgets), cat and ls', async () => {
    const source = join(dir.path, 'first-line.c');
    const binary = join(dir.path, 'first-line');
    writeFileSync(
      source,
      '#include <stdio.h>\nint main(int c, char **v) { char line[256]; FILE *f = fopen(v[1], "r"); if (!f) { perror("fopen"); return 1; } if (!fgets(line, sizeof line, f)) return 2; fputs(line, stdout); return fclose(f); }\n',
    );
    execFileSync('gcc', ['-O2', '-o', binary, source]);
    expect(await inApp([binary, '/etc/app.conf'])).toBe('listen = 8080\n');
    expect(await inApp(['cat', '/secrets/token', '/app/config.json'])).toBe(
      's3cr=t\n{"feature": true}',
    );
    expect(await inApp(['ls', '-1', '/app'])).toBe('absolute\nconfig.json\nsub\nthrough-proc\n');
    expect(await inApp(['ls', '-A', '/secrets'])).toBe('token\n');
    // --fs-local keeps a target's path here (this machine has no /app: ENOENT), --fs-remote
    // reads one of this machine's own from the target (the target's /usr/bin is this
    // machine's, bound in: the same bytes either way, so /tmp is what tells them apart).
    const kept = mirrord([
      '--pid',
      String(target.pid),
      '--fs-local',
      '/app/*',
      '--',
      'cat',
      '/app/config.json',
    ]);
    expect(await kept.exited).toBe(1);
    expect(kept.output()).toMatch(/cat: \/app\/config.json: No such file or directory/);
    writeFileSync(join(dir.path, 'here.txt'), 'this machine');
    const remote = mirrord([
      '--pid',
      String(target.pid),
      '--fs-remote',
      '/tmp/*',
      '--',
      'cat',
      join(dir.path, 'here.txt'),
    ]);
    expect(await remote.exited).toBe(1);
    expect(remote.output()).toMatch(/No such file or directory/);
    // With --fs local the app sees this machine's files only.
    const run = mirrord([
      '--pid',
      String(target.pid),
      '--fs',
      'local',
      '--',
      'cat',
      '/secrets/token',
    ]);
    expect(await run.exited).toBe(1);
  }, 60_000);
});
