def prepare_args():
    d = CFG["dataset"]
    if d["kind"] == "digits":
        return f"--kind digits --image-size {d['image_size']} --seed {d['split_seed']}"
    verify = "" if d["verify_images"] else " --no-verify-images"
    return (
        f"--kind imagefolder --root {q(d['root'])} --train-dir {q(d['train_dir'])} "
        f"--val-dir {q(d['val_dir'])} --name {q(d['name'])} --image-size {d['image_size']} "
        f"--hash-mode {d['hash_mode']} --on-bad-image {d['on_bad_image']}{verify}"
    )


rule prepare_data:
    output:
        data=directory(DATA),
    params:
        args=prepare_args(),
    log:
        f"logs/prepare_data/{DATASET}.log",
    shell:
        "{NOISYNN} prepare {params.args} --out {output.data} > {log} 2>&1"
