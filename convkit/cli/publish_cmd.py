"""``convkit publish DIR --repo OWNER/NAME``."""
from __future__ import annotations

import json

import click


@click.command("publish")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--repo", required=True, metavar="OWNER/NAME", help="The Hub model repo.")
@click.option("--revision", default=None, metavar="BRANCH",
              help="Branch to commit to (created if missing). [default: main]")
@click.option("--private", is_flag=True, help="Create the repo private (if it is new).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing.")
@click.option("--license", "license_", default=None, metavar="ID",
              help="The release's licence, a Hub licence id (openrail++, apache-2.0, ...) or "
                   "'other' with --license-name/--license-link. Default: the base's, when known.")
@click.option("--license-name", default=None, help="With --license other: the licence's id.")
@click.option("--license-link", default=None, help="With --license other: URL of its text.")
@click.option("--base-model", multiple=True, metavar="OWNER/NAME",
              help="A base model's Hub id for the card (repeatable; added to the recipe's).")
@click.option("--relation", type=click.Choice(["adapter", "merge", "quantized", "finetune"]),
              default=None, help="base_model_relation (default: from what the recipe did).")
@click.option("--message", "-m", default=None, help="Commit message.")
@click.option("--allow-failed", is_flag=True, help="Publish even if a verify gate failed.")
@click.option("--dry-run", is_flag=True,
              help="Print the card and the files to commit; no network, no token needed.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON result on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress and no summary.")
def publish_cmd(folder, repo, revision, private, create_pr, license_, license_name,
                license_link, base_model, relation, message, allow_failed, dry_run, as_json,
                quiet):
    """Publish a release folder (the output of convkit run, or any folder of files) to the
    Hugging Face Hub as one commit, with a generated model card (README.md).

    The card's YAML is validated before any upload; only files that differ from the Hub's are
    sent; afterwards each file's sha256 on the Hub is checked. Re-running with nothing changed
    makes no commit. Token: HF_TOKEN or `hf auth login` (never printed or written).

    \b
    Examples:
      convkit publish lightning-merge --repo me/juggernaut-lightning --dry-run
      convkit publish lightning-merge --repo me/juggernaut-lightning --license openrail++
      convkit publish flux-lowvram --repo me/flux-dev-lowvram --create-pr
    """
    from ..publish import publish

    if quiet or as_json:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    r = publish(folder, repo, revision=revision, private=private, create_pr=create_pr,
                dry_run=dry_run, license=license_, license_name=license_name,
                license_link=license_link, base_model=base_model, relation=relation,
                message=message, allow_failed=allow_failed)
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
        return
    if quiet:
        return
    if dry_run:
        click.echo(r.card)
        click.echo(f"--- would commit to {repo}@{r.revision}"
                   + (" as a pull request" if create_pr else "") + ":")
        for o in r.operations:
            click.echo(f"  {o['path']} ({o['bytes']:,d} bytes, sha256 {o['sha256'][:12]})")
        return
    for n in r.notes:
        click.echo(n)
    if r.commit_oid:
        click.echo(f"committed {len(r.changed)} files ({r.uploaded_bytes:,d} bytes) to {repo}"
                   f"@{r.revision}: {r.pr_url or r.commit_url}; {r.checked} files' sha256 "
                   "checked on the Hub")
