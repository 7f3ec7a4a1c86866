import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

let root: string | undefined;

/**
 * The directory holding mirrord's package.json. Modules run from `dist/` (installed CLI),
 * `src/` (jest) or `.bench-out/src/` (benchmarks), so paths to the addon and the CLI entry are
 * found from here rather than by a fixed number of `..`.
 */
export function packageRoot(): string {
  if (root) return root;
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json'))) {
    const parent = dirname(dir);
    if (parent === dir) throw new Error('mirrord package root not found');
    dir = parent;
  }
  root = dir;
  return root;
}

/** The layer that `mirror` preloads into the local app (built by `make -C layer`). */
export function layerPath(): string {
  return join(packageRoot(), 'layer', '.output', 'mirrord_layer.so');
}
