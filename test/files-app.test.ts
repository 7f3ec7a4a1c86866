/**
 * The target's files in the mirrored app, as a user runs it: `mirrord mirror --pid` into real
 * runtimes (node's fs in its sync, promise and stream forms, python3's open and os, a C
 * program's fopen/fgets, cat), against a target chrooted in a mount namespace of its own whose
 * files only it has. The app reads the target's paths from the target, byte for byte, and its
 * own (working directory, /tmp, its runtime) locally.
 */
import { execFileSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  closeSync,
  constants,
  mkdirSync,
  openSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';
import { agentsOf, mirrord, tempDir } from './support/mirror-cli.js';
import { waitFor } from './support/wait.js';
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

  test("directories: find, ls -l, python's fwalk and dir_fd, a C program's fdopendir and getdents64; a listing is the target's as it is now", async () => {
    // find walks with openat(O_DIRECTORY), fdopendir and fstatat on the descriptor.
    expect((await inApp(['find', '/app', '/secrets'])).split('\n').filter(Boolean).sort()).toEqual([
      '/app',
      '/app/absolute',
      '/app/config.json',
      '/app/sub',
      '/app/through-proc',
      '/secrets',
      '/secrets/token',
    ]);
    expect((await inApp(['find', '/app', '-type', 'l'])).split('\n').sort()).toEqual([
      '',
      '/app/absolute',
      '/app/through-proc',
    ]);
    expect(await inApp(['find', '/app', '-name', '*.json', '-size', '17c'])).toBe(
      '/app/config.json\n',
    );
    // The same with a temporary directory reached through a symlink (the session's directory,
    // where the stand-ins are, is then named two ways).
    const linked = join(dir.path, 'linked-tmp');
    mkdirSync(join(dir.path, 'real-tmp'));
    symlinkSync(join(dir.path, 'real-tmp'), linked);
    const throughLink = mirrord(
      ['--pid', String(target.pid), '--', 'find', '/app', '-name', '*.json', '-size', '17c'],
      { env: { TMPDIR: linked } },
    );
    expect(await throughLink.exited).toBe(0);
    expect(throughLink.stdout()).toBe('/app/config.json\n');
    // ls -l: the target's sizes, and no error for the extended attributes it asks after.
    const long = await inApp(['ls', '-l', '/app']);
    expect(long).toMatch(/^-rw-r--r-- 1 \S+ \S+ +17 .* config\.json$/m);
    expect(long).toMatch(/^l.* absolute -> \/etc\/app\.conf$/m);

    const program = [
      'import json, os',
      'out = {"walk": [[root, sorted(dirs), sorted(files)] for root, dirs, files, _ in os.fwalk("/app")]}',
      'fd = os.open("/app", os.O_RDONLY)',
      'out["listdir_fd"] = sorted(os.listdir(fd))',
      'out["same"] = os.path.samestat(os.fstat(fd), os.stat("/app"))',
      'out["size_at"] = os.stat("config.json", dir_fd=fd).st_size',
      'out["read_at"] = os.read(os.open("config.json", os.O_RDONLY, dir_fd=fd), 100).decode()',
      'out["link_at"] = os.readlink("absolute", dir_fd=fd)',
      'out["scandir_fd"] = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in os.scandir(fd))',
      'print(json.dumps(out))',
    ].join('\n');
    expect(JSON.parse(await inApp(['/usr/bin/python3', '-c', program]))).toEqual({
      walk: [
        ['/app', ['sub'], ['absolute', 'config.json', 'through-proc']],
        ['/app/sub', [], []],
      ],
      listdir_fd: ['absolute', 'config.json', 'sub', 'through-proc'],
      same: true,
      size_at: 17,
      read_at: '{"feature": true}',
      link_at: '/etc/app.conf',
      scandir_fd: [
        ['absolute', false],
        ['config.json', false],
        ['sub', true],
        ['through-proc', false],
      ],
    });

    // getdents64 called directly (as Go and Rust programs list), and a listing taken twice
    // while the target's directory changes in between: the second is the target's new one.
    const source = join(dir.path, 'list.c');
    const binary = join(dir.path, 'list');
    writeFileSync(
      source,
      [
        '#define _GNU_SOURCE',
        '#include <dirent.h>',
        '#include <fcntl.h>',
        '#include <stdio.h>',
        '#include <string.h>',
        '#include <sys/syscall.h>',
        '#include <unistd.h>',
        'static void list(const char *path) {',
        '  char buf[4096];',
        '  int fd = open(path, O_RDONLY | O_DIRECTORY);',
        '  if (fd < 0) { perror(path); return; }',
        '  for (long n; (n = syscall(SYS_getdents64, fd, buf, sizeof buf)) > 0;)',
        '    for (long at = 0; at < n; at += ((struct dirent64 *)(buf + at))->d_reclen) {',
        '      struct dirent64 *e = (struct dirent64 *)(buf + at);',
        '      if (e->d_name[0] != 0x2e) printf("%s:%d ", e->d_name, e->d_type);',
        '    }',
        '  DIR *d = fdopendir(fd);',
        '  rewinddir(d);',
        '  int count = 0;',
        '  while (readdir(d)) count++;',
        '  printf("(%d)\\n", count);',
        '  closedir(d);',
        '}',
        'int main(int argc, char **argv) {',
        '  (void)argc;',
        // Waits for the test's word through a FIFO, opened (read and write, so that reading
        // waits for data rather than for a writer) before the first listing tells the test to
        // go on; alarm() is the deadline (SIGALRM ends the program, and the test fails).
        '  int go = open(argv[2], O_RDWR);',
        '  list(argv[1]);',
        '  fflush(stdout);',
        '  alarm(30);',
        '  char word;',
        '  if (go < 0 || read(go, &word, 1) != 1) return 1;',
        '  list(argv[1]);',
        '  return 0;',
        '}',
      ].join('\n'),
    );
    execFileSync('gcc', ['-O2', '-o', binary, source]);
    const go = join(dir.path, 'go');
    execFileSync('mkfifo', [go]);
    const run = mirrord(['--pid', String(target.pid), '--', binary, '/secrets', go]);
    await waitFor('the first listing', () => run.stdout().includes('\n'), { ms: 30_000 });
    const added = `/proc/${target.pid}/root/secrets/added`;
    writeFileSync(added, 'x');
    // Non-blocking: a program that is gone makes this fail (ENXIO) rather than wait.
    const end = openSync(go, constants.O_WRONLY | constants.O_NONBLOCK);
    writeSync(end, 'g');
    closeSync(end);
    const code = await run.exited;
    rmSync(added);
    expect({ code, output: run.output() }).toMatchObject({ code: 0 });
    const listings = run
      .stdout()
      .trim()
      .split('\n')
      .map((line) => line.split(' ').sort());
    // Names with their d_type (8: a regular file), then how many entries readdir gave.
    expect(listings).toEqual([
      ['(3)', 'token:8'],
      ['(4)', 'added:8', 'token:8'],
    ]);
  }, 120_000);

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
