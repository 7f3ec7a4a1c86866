import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { packageRoot } from '../../src/package-root.js';
import type { Container } from './types.js';

/**
 * The stand-in's image "registry": the images its kubelet can run, and how. No image is pulled;
 * an image names what runs:
 * - a repository ending in `mirrord-agent` (any registry, any tag): this repository's CLI, so
 *   `mirrord agent …` runs as `node <repo>/bin/run.js agent …` with the current Node;
 * - `stand-in/local` (any tag): the container's command, run as given;
 * - anything else cannot be pulled (ErrImagePull, then ImagePullBackOff).
 */

export type ImageKind = 'agent' | 'local';

/** `ghcr.io/a/b:1.2@sha256:…` → `ghcr.io/a/b`. */
export function imageRepository(image: string): string {
  const withoutDigest = image.split('@')[0] ?? image;
  const slash = withoutDigest.lastIndexOf('/');
  const colon = withoutDigest.lastIndexOf(':');
  return colon > slash ? withoutDigest.slice(0, colon) : withoutDigest;
}

export function imageKind(image: string): ImageKind | undefined {
  const repository = imageRepository(image);
  if (/(^|\/)mirrord-agent$/.test(repository)) return 'agent';
  if (repository === 'stand-in/local') return 'local';
  return undefined;
}

/** A stable digest per image reference, for containerStatuses[].imageID. */
export function imageId(image: string): string {
  const digest = createHash('sha256').update(image).digest('hex');
  return `${imageRepository(image)}@sha256:${digest}`;
}

/**
 * The argv a container runs: its command and args. The agent image's entrypoint is `mirrord`
 * (so a container with only args runs `mirrord <args>`), and `mirrord` is this repository's CLI.
 * Undefined when there is nothing to run.
 */
export function containerArgv(container: Container, kind: ImageKind): string[] | undefined {
  const command = container.command?.length
    ? container.command
    : kind === 'agent'
      ? ['mirrord']
      : [];
  const argv = [...command, ...(container.args ?? [])];
  if (argv.length === 0) return undefined;
  if (kind === 'agent' && argv[0] === 'mirrord') {
    return [process.execPath, join(packageRoot(), 'bin', 'run.js'), ...argv.slice(1)];
  }
  return argv;
}

export function pullFailure(image: string): string {
  return `Failed to pull image "${image}": rpc error: code = NotFound desc = failed to pull and unpack image "${image}": failed to resolve reference "${image}": ${image}: not found`;
}

export function pullBackOff(image: string): string {
  return `Back-off pulling image "${image}"`;
}
