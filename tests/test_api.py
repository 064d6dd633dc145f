"""models.load (models/api.py), python -m models.export and the checkpoint-reading rules: the
exported directory gives the checkpoint's own ITC and ITM scores, pickled files are read with the
restricted unpickler, and only a trusted or recognised released file is read with more.

The checkpoints are demo-sized models with random weights, saved as the scripts save theirs
({'model', 'config', ...}): equality between the ways of loading them is what is tested."""
import argparse
import fractions
import importlib
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import engine
import models
import Pretrain
from configuration import ConfigError, load_yaml
from conftest import ROOT, TINY_CONFIG, _relocate
from engine.checkpointing import Checkpointer, TrainState
from models import api, gradcam
from models.checkpoint import CheckpointError, read_checkpoint, strip_for_release
from models.export import main as export_main

CAPTIONS = ['the red circle', 'a small blue square on the left', 'two green triangles']


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    """A demo world and the demo config (64 px ViT, 6-layer BERT fused from layer 3) pointing at it."""
    from dataset import toy
    base = tmp_path_factory.mktemp('api')
    world = str(base / 'data')
    toy.main(['--out', world, '--scale', '0.05'])
    config = load_yaml(os.path.join(ROOT, 'configs', 'demo', 'Pretrain.yaml'))
    config = {k: _relocate(v, world) for k, v in config.items()}
    config.update(distill=True, answer_list=os.path.join(world, 'answer_list.json'))
    images = sorted(os.path.join(world, 'images', p) for p in os.listdir(os.path.join(world, 'images')))[:3]
    return {'base': base, 'world': world, 'config': config, 'images': images}


def save_task_checkpoint(demo, task, seed=0):
    """A checkpoint of `task` as our scripts write it (model entry with momentum encoders and queues,
    the run's config with the bert_config path relative to the repository)."""
    from models.tokenization_bert import BertTokenizer
    path = demo['base'] / f'{task}.pth'
    if not path.exists():
        torch.manual_seed(seed)
        module = importlib.import_module(f'models.model_{task}')
        kwargs = {'init_deit': False} if task == 'pretrain' else {'text_decoder': None} if task == 'vqa' else {}
        tokenizer = BertTokenizer.from_pretrained(demo['config']['text_encoder'])
        config = {**demo['config'], 'bert_config': os.path.join(ROOT, demo['config']['bert_config'])}
        model = module.ALBEF(text_encoder=None, tokenizer=tokenizer, config=config, **kwargs)
        for tensor in model.parameters():  # away from the init: every weight matters
            tensor.data.add_(0.02 * torch.randn_like(tensor))
        torch.save({'model': model.state_dict(), 'optimizer': {}, 'config': demo['config'], 'epoch': 0}, path)
    return str(path)


def test_export_then_load_gives_the_checkpoints_scores(demo, monkeypatch, capsys):
    checkpoint = save_task_checkpoint(demo, 'retrieval')
    out = demo['base'] / 'export_retrieval'
    export_main([checkpoint, '--out', str(out)])
    assert f'wrote {out}: config.json, model.safetensors, tokenizer.json, tokenizer_config.json, vocab.txt' \
        in capsys.readouterr().out
    with open(out / 'config.json') as f:
        config = json.load(f)
    assert config['task'] == 'retrieval' and config['image_res'] == 64 and config['vision_num_heads'] == 4
    assert config['bert_config']['fusion_layer'] == 3 and config['bert_config']['num_attention_heads'] == 4
    weights = read_checkpoint(str(out))
    full = torch.load(checkpoint, weights_only=True)['model']
    assert set(weights) == set(strip_for_release(full))  # no momentum encoders, no queues
    assert all(torch.equal(weights[k], full[k]) for k in weights)

    from_checkpoint = models.load(checkpoint, device='cpu')

    def no_unpickling(*args, **kwargs):
        raise AssertionError('models.load(DIR) must not unpickle anything')
    monkeypatch.setattr(torch, 'load', no_unpickling)
    from_export = models.load(str(out), device='cpu')
    monkeypatch.undo()

    assert from_checkpoint.task == from_export.task == 'retrieval'
    images = demo['images']
    itc = from_checkpoint.similarity(images, CAPTIONS)
    assert itc.shape == (3, 3)
    assert torch.equal(itc, from_export.similarity(images, CAPTIONS))
    itm = from_checkpoint.itm(images, CAPTIONS)
    assert itm.shape == (3,) and ((itm > 0) & (itm < 1)).all()
    assert torch.equal(itm, from_export.itm(images, CAPTIONS))
    # the same numbers as the model's own forward pieces, on the transformed images
    embeds = from_export.embed_images(images)
    torch.testing.assert_close(embeds.norm(dim=1), torch.ones(3))
    batch = torch.stack([from_export.transform(Image.open(p).convert('RGB')) for p in images])
    torch.testing.assert_close(embeds, from_export.embed_images(batch))
    torch.testing.assert_close(itc, embeds @ from_export.embed_texts(CAPTIONS).T)


def test_scripts_start_from_an_export(demo, capsys):
    """--checkpoint DIR: load_checkpoint reads the export's safetensors (fine-tuning starts from it)."""
    from models.checkpoint import load_checkpoint
    from models.model_retrieval import ALBEF
    from models.tokenization_bert import BertTokenizer
    checkpoint = save_task_checkpoint(demo, 'retrieval')
    out = demo['base'] / 'export_for_training'
    export_main([checkpoint, '--out', str(out)])
    config = {**demo['config'], 'bert_config': os.path.join(ROOT, demo['config']['bert_config'])}
    model = ALBEF(tokenizer=BertTokenizer.from_pretrained(str(out)), config=config)
    report = load_checkpoint(model, str(out))
    assert report.momentum_from_online
    full = torch.load(checkpoint, weights_only=True)['model']
    own = model.state_dict()
    assert all(torch.equal(own[k], full[k]) for k in full if not k.split('.')[0].endswith('_m') and 'queue' not in k)
    assert torch.equal(own['text_encoder_m.encoder.layer.4.output.dense.weight'],
                       full['text_encoder.encoder.layer.4.output.dense.weight'])


def test_pretrain_checkpoint_loads_as_itself_and_exported(demo, capsys):
    checkpoint = save_task_checkpoint(demo, 'pretrain')
    out = demo['base'] / 'export_pretrain'
    export_main([checkpoint, '--out', str(out)])
    a, b = models.load(checkpoint, device='cpu'), models.load(str(out), device='cpu')
    assert a.task == b.task == 'pretrain'
    # the MLM head travels with the export (it is the pre-training checkpoint), the momentum model does not
    assert any(k.startswith('text_encoder.cls.') for k in read_checkpoint(str(out)))
    assert torch.equal(a.similarity(demo['images'], CAPTIONS), b.similarity(demo['images'], CAPTIONS))
    assert torch.equal(a.itm(demo['images'][0], CAPTIONS), b.itm(demo['images'][0], CAPTIONS))


def test_vqa_answers_and_exported_answer_list(demo, capsys):
    checkpoint = save_task_checkpoint(demo, 'vqa')
    out = demo['base'] / 'export_vqa'
    export_main([checkpoint, '--out', str(out)])
    with open(demo['config']['answer_list']) as f:
        answer_list = json.load(f)
    with open(out / 'answer_list.json') as f:
        assert json.load(f) == answer_list
    a, b = models.load(checkpoint, device='cpu'), models.load(str(out), device='cpu')
    questions = ['what colour is the circle?', 'how many shapes are there?']
    answers = a.answer(demo['images'][0], questions, k=3)
    assert answers == b.answer(demo['images'][0], questions, k=3)
    assert len(answers) == 2 and all(len(top) == 3 for top in answers)
    for top in answers:
        assert all(answer in answer_list for answer, _ in top)
        probabilities = [p for _, p in top]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
    assert len(a.answer(demo['images'][0], questions[0], k=10 ** 6)[0]) == len(answer_list)


def test_methods_a_task_lacks_raise_task_error(demo):
    retrieval = models.load(save_task_checkpoint(demo, 'retrieval'), device='cpu')
    with pytest.raises(models.TaskError, match=r"^this is a 'retrieval' checkpoint; answering questions needs a "
                                               r"VQA checkpoint \(vqa\.pth\)$"):
        retrieval.answer(demo['images'][0], 'what is it?')
    vqa = models.load(save_task_checkpoint(demo, 'vqa'), device='cpu', answer_list=[])
    with pytest.raises(api.TaskError, match=r"^this is a 'vqa' checkpoint; image and text embeddings \(ITC\) need "
                                            r"a pre-training or retrieval checkpoint"):
        vqa.embed_texts(['a red circle'])
    with pytest.raises(api.TaskError, match=r"^this is a 'vqa' checkpoint; Grad-CAM maps need the ITM head"):
        vqa.gradcam(demo['images'][0], 'a red circle')
    with pytest.raises(api.TaskError, match='answering questions needs the list of candidate answers'):
        vqa.answer(demo['images'][0], 'what is it?')
    with pytest.raises(ValueError, match='itm scores pairs: got 2 images and 3 texts'):
        retrieval.itm(demo['images'][:2], CAPTIONS)


def test_gradcam_words_maps_and_block_clipping(demo):
    m = models.load(save_task_checkpoint(demo, 'retrieval'), device='cpu')
    picture = Image.open(demo['images'][0]).convert('RGB').resize((80, 48))  # not square, not 64 px
    cam = m.gradcam(picture, 'The red circle!')
    assert cam.words == ['the', 'red', 'circle']  # cleaned as in training: lower case, no punctuation
    assert cam.maps.shape == (3, 48, 80) and cam.maps.dtype == np.float32
    assert cam.maps.min() >= 0 and np.allclose(cam.maps.max(axis=(1, 2)), 1)
    assert cam.itm == pytest.approx(float(m.itm(picture, 'the red circle')[0]))
    # fusion layers 3-5: 8 is clipped to 4 (layer 5's word rows never reach the ITM head)
    tokens = m.tokenizer('the red circle', return_tensors='pt')
    image = m.transform(picture).unsqueeze(0)
    assert gradcam.itm_gradcam(m.model, image, tokens, 5)[0][0, 1:].abs().max() == 0
    assert gradcam.itm_gradcam(m.model, image, tokens, 4)[0][0, 1:].abs().min(dim=0).values.max() > 0
    assert np.array_equal(cam.maps, m.gradcam(picture, 'the red circle', block_num=4).maps)
    assert not np.array_equal(cam.maps, m.gradcam(picture, 'the red circle', block_num=3).maps)


def tiny_loaded(make_model, tokenizer, task, seed=0):
    """A `LoadedModel` around the tiny `task` model of conftest (32 px, random weights)."""
    return api.LoadedModel(make_model(task, seed).eval(), task, dict(TINY_CONFIG), tokenizer, torch.device('cpu'))


def pictures(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)) for _ in range(n)]


def test_itm_is_the_probability_of_the_match_logit(make_model, tokenizer):
    """The ITM head's logits are (no match, match): with its weights zeroed and biases (0, log 3),
    every pair's logits are exactly (0, log 3) and P(match) = 3 / (1 + 3) = 0.75, P(no match) 0.25."""
    m = tiny_loaded(make_model, tokenizer, 'retrieval')
    images, texts = pictures(3), ['a red circle', 'two blue squares on the left', 'green']
    varied = m.itm(images, texts)
    assert all(float(p) == pytest.approx(float(m.itm(i, t)[0]), abs=1e-6) for p, i, t in zip(varied, images, texts))
    assert len(set(varied.tolist())) == 3  # the pairs score differently with the random head
    with torch.no_grad():
        m.model.itm_head.weight.zero_()
        m.model.itm_head.bias.copy_(torch.tensor([0.0, math.log(3)]))
    torch.testing.assert_close(m.itm_logits(images, texts), torch.tensor([[0.0, math.log(3)]] * 3))
    torch.testing.assert_close(m.itm(images, texts), torch.full((3,), 0.75))
    torch.testing.assert_close(m.itm(images[0], texts), torch.full((3,), 0.75))  # one image, every text


def test_entailment_is_the_probability_of_each_label(make_model, tokenizer):
    """`entailment` gives (contradiction, neutral, entailment) probabilities in the VE head's order:
    with the head's last layer zeroed and biases log(1, 2, 5), every pair gets (1/8, 2/8, 5/8)."""
    m = tiny_loaded(make_model, tokenizer, 've')
    images, texts = pictures(3, seed=1), ['a red circle', 'two blue squares on the left', 'there is nothing']
    probs = m.entailment(images, texts)
    assert probs.shape == (3, 3) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))
    for row, image, text in zip(probs, images, texts):  # each pair as if asked alone, in batches of any size
        torch.testing.assert_close(row, m.entailment(image, text)[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m.entailment(images, texts, batch_size=2), probs, atol=1e-6, rtol=1e-5)
    assert (probs[0] - probs[1]).abs().max() > 1e-4  # the pairs score differently with the random head
    torch.testing.assert_close(m.entailment(images[0], texts), torch.stack([m.entailment(images[0], t)[0]
                                                                          for t in texts]), atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        last = m.model.cls_head[-1]
        last.weight.zero_()
        last.bias.copy_(torch.log(torch.tensor([1.0, 2.0, 5.0])))
    torch.testing.assert_close(m.entailment(images, texts), torch.tensor([[1 / 8, 2 / 8, 5 / 8]] * 3))
    assert api.VE_LABELS == ('contradiction', 'neutral', 'entailment')  # the labels of VE.py's datasets: 0, 1, 2
    with pytest.raises(ValueError, match='^entailment scores pairs: got 2 images and 3 texts$'):
        m.entailment(images[:2], texts)
    retrieval = tiny_loaded(make_model, tokenizer, 'retrieval')
    with pytest.raises(api.TaskError, match=r"^this is a 'retrieval' checkpoint; visual entailment needs an SNLI-VE "
                                            r"checkpoint$"):
        retrieval.entailment(images, texts)


def test_task_is_read_from_the_keys(demo):
    from models.checkpoint import pretrain_to_vqa
    for task in ('pretrain', 'retrieval', 'vqa', 've', 'nlvr', 'pretrain_nlvr'):
        state_dict = torch.load(save_task_checkpoint(demo, task), weights_only=True)['model']
        assert api.infer_task(state_dict) == task
    pretrain = torch.load(save_task_checkpoint(demo, 'pretrain'), weights_only=True)['model']
    assert api.infer_task(pretrain_to_vqa(pretrain)) == 'vqa'
    assert api.infer_task({'visual_encoder.cls_token': torch.zeros(1)}) is None


def released_state_dict(image_res, pairs=False):
    """The keys and shapes that model_config reads, as in ALBEF.pth / refcoco.pth at width 8."""
    grid = image_res // 16
    sd = {'visual_encoder.pos_embed': torch.zeros(1, grid * grid + 1, 8),
          'visual_encoder.patch_embed.proj.weight': torch.zeros(8, 3, 16, 16),
          'vision_proj.weight': torch.zeros(256, 8)}
    sd.update({f'visual_encoder.blocks.{n}.norm1.weight': torch.zeros(8) for n in range(12)})
    prefix = 'text_encoder.'
    sd[prefix + 'embeddings.word_embeddings.weight'] = torch.zeros(30522, 8)
    sd[prefix + 'embeddings.position_embeddings.weight'] = torch.zeros(512, 8)
    sd[prefix + 'embeddings.token_type_embeddings.weight'] = torch.zeros(2, 8)
    layers = 18 if pairs else 12
    for n in range(layers):
        sd[f'{prefix}encoder.layer.{n}.intermediate.dense.weight'] = torch.zeros(32, 8)
        if n >= 6:
            sd[f'{prefix}encoder.layer.{n}.crossattention.self.key.weight'] = torch.zeros(8, 8)
    return sd


def test_config_yaml_overrides_the_stored_config(demo, tmp_path):
    """`config=` a task YAML: its keys override the checkpoint's; a bad file is one ConfigError line."""
    checkpoint = save_task_checkpoint(demo, 'retrieval')
    assert api.resolve(checkpoint).config['temp'] == demo['config']['temp']
    (tmp_path / 'task.yaml').write_text('temp: 0.25\n')
    assert api.resolve(checkpoint, config=tmp_path / 'task.yaml').config['temp'] == 0.25
    with pytest.raises(ConfigError, match=f'^config file not found: {tmp_path / "none.yaml"}$'):
        api.resolve(checkpoint, config=tmp_path / 'none.yaml')
    (tmp_path / 'list.yaml').write_text('- temp\n')
    with pytest.raises(ConfigError, match=r'list\.yaml: expected a mapping of keys to values at the top level$'):
        api.resolve(checkpoint, config=str(tmp_path / 'list.yaml'))


def test_released_files_sizes_from_the_weights():
    """A bare state_dict (the released fine-tuned files store no config): the sizes come from the
    weights, the rest from configs/config_bert.json, heads of width 64."""
    config = api.model_config(released_state_dict(384), 'retrieval')
    assert {k: config[k] for k in ('image_res', 'patch_size', 'vision_width', 'vision_depth', 'vision_num_heads',
                                   'embed_dim')} == {'image_res': 384, 'patch_size': 16, 'vision_width': 8,
                                                     'vision_depth': 12, 'vision_num_heads': 1, 'embed_dim': 256}
    bert = config['bert_config']
    assert (bert['hidden_size'], bert['num_hidden_layers'], bert['fusion_layer'], bert['encoder_width'],
            bert['intermediate_size'], bert['vocab_size'], bert['num_attention_heads']) == (8, 12, 6, 8, 32, 30522, 1)
    assert bert['hidden_act'] == 'gelu' and bert['layer_norm_eps'] == 1e-12
    assert api.model_config(released_state_dict(256), 'pretrain')['image_res'] == 256
    # the image-pair models hold every fusion layer twice: 18 layers of a 12-layer BERT
    assert api.model_config(released_state_dict(384, pairs=True), 'nlvr')['bert_config']['num_hidden_layers'] == 12


# ---- reading pickled files ----------------------------------------------------------------------
def test_our_checkpoints_need_no_trust(demo):
    """What the scripts save (with the resume entry) loads with torch.load(weights_only=True)."""
    import utils
    config = load_yaml(os.path.join(ROOT, 'configs', 'demo', 'Pretrain.yaml'))
    run = engine.Run(args=argparse.Namespace(), config=config, output_dir=str(demo['base'] / 'run'))
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    logger = utils.MetricLogger()
    logger.update(loss=torch.tensor(1.5))
    run.scaler = torch.amp.GradScaler('cpu', enabled=False)
    checkpointer = Checkpointer(run.output_dir, model, optimizer, scheduler, config)
    checkpointer.save('checkpoint_00.pth', TrainState(epoch=1, step=0, meters=logger.state_dict()), epoch=0)
    checkpointer.save('checkpoint_last.pth', TrainState(epoch=1, step=3, meters=logger.state_dict()))
    loaded = torch.load(run.path('checkpoint_last.pth'), weights_only=True)
    assert loaded['resume']['step'] == 3 and torch.equal(loaded['model']['weight'], model.weight)
    torch.save({'model': {}, 'config': fractions.Fraction(1, 3)}, run.path('checkpoint_99.pth'))
    path, newest = checkpointer.newest()  # the furthest along; the file that needs unpickling is skipped
    assert path == run.path('checkpoint_last.pth') and newest['resume']['step'] == 3
    assert checkpointer.resume().step == 3


def test_released_file_recognised_by_its_keys(demo, capsys):
    """ALBEF.pth-like: {'model', 'optimizer', 'lr_scheduler', 'config', 'epoch'} with an argparse
    Namespace: read with the restricted unpickler (the Namespace allowed), no trust needed."""
    full = torch.load(save_task_checkpoint(demo, 'retrieval'), weights_only=True)
    path = demo['base'] / 'released.pth'
    torch.save({'model': full['model'], 'optimizer': {}, 'lr_scheduler': {}, 'epoch': 29,
                'config': argparse.Namespace(**full['config'])}, path)
    m = models.load(str(path), device='cpu')
    assert f'{path}: a released ALBEF checkpoint (recognised by its keys); its argparse.Namespace read with ' \
           f'the restricted unpickler' in capsys.readouterr().out
    assert m.config['vision_num_heads'] == 4  # from the Namespace
    reference = models.load(save_task_checkpoint(demo, 'retrieval'), device='cpu')
    assert torch.equal(m.itm(demo['images'], CAPTIONS), reference.itm(demo['images'], CAPTIONS))
    # the same Namespace under other keys is not a released file
    torch.save({'weights': full['model'], 'args': argparse.Namespace(a=1)}, path)
    with pytest.raises(CheckpointError, match=r'holds Python objects besides tensors \(argparse\.Namespace\)'):
        read_checkpoint(str(path))


def test_objects_need_trust(demo, capsys):
    full = torch.load(save_task_checkpoint(demo, 'retrieval'), weights_only=True)
    path = demo['base'] / 'object.pth'
    torch.save({'model': full['model'], 'config': full['config'], 'note': fractions.Fraction(1, 3)}, path)
    with pytest.raises(CheckpointError) as error:
        models.load(str(path), device='cpu')
    assert str(error.value) == (f'{path} holds Python objects besides tensors (fractions.Fraction), and unpickling '
                                f'them can run code: pass --trust_checkpoint (config key trust_checkpoint: true) if '
                                f'you trust its source')
    m = models.load(str(path), device='cpu', trust_checkpoint=True)
    printed = capsys.readouterr().out
    assert f'{path}: fully unpickled, as --trust_checkpoint asks (it holds fractions.Fraction)' in printed
    assert m.task == 'retrieval'


def test_not_a_checkpoint(demo, tmp_path):
    png = tmp_path / 'photo.pth'
    Image.new('RGB', (4, 4)).save(png, format='PNG')
    with pytest.raises(CheckpointError, match=r'^.*photo\.pth is not a PyTorch checkpoint \(a PNG image\)$'):
        models.load(str(png))
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(CheckpointError, match=r'empty\.pth is not a PyTorch checkpoint \(empty\)$'):
        read_checkpoint(str(tmp_path / 'empty.pth'))
    with pytest.raises(CheckpointError, match=r'test_not_a_checkpoint0: a directory without config\.json \(expected '
                                              r'an export of python -m models\.export\)$'):
        models.load(str(tmp_path))
    (tmp_path / 'config.json').write_text('{}')
    with pytest.raises(CheckpointError, match=r'test_not_a_checkpoint0: a directory without model\.safetensors'):
        models.load(str(tmp_path))


def run_pretrain(argv, tmp_path, capsys):
    """Pretrain.py in-process, as `python Pretrain.py ...`: its exit status and stderr lines."""
    with pytest.raises(SystemExit) as exit_info:
        engine.launch(Pretrain.main, Pretrain.get_parser(), [*map(str, argv), '--output_dir', str(tmp_path / 'out'),
                                                             '--device', 'cpu'])
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def test_scripts_checkpoint_flags(demo_config, demo, tmp_path, capsys):
    """--checkpoint PNG: one line naming it; a file with objects: one line asking for
    --trust_checkpoint, with which it is unpickled and checked against the model."""
    config = demo_config('Pretrain', batch_size=8, queue_size=32, num_workers=0)
    png = tmp_path / 'cat.png'
    Image.new('RGB', (4, 4)).save(png)
    assert run_pretrain(['--config', config, '--checkpoint', png], tmp_path, capsys) == \
        (2, [f'error: {png} is not a PyTorch checkpoint (a PNG image)'])
    ve = torch.load(save_task_checkpoint(demo, 've'), weights_only=True)
    path = tmp_path / 've.pth'
    torch.save({'model': ve['model'], 'note': fractions.Fraction(1, 3)}, path)
    code, lines = run_pretrain(['--config', config, '--checkpoint', path], tmp_path, capsys)
    assert code == 2 and lines == [f'error: {path} holds Python objects besides tensors (fractions.Fraction), and '
                                   f'unpickling them can run code: pass --trust_checkpoint (config key '
                                   f'trust_checkpoint: true) if you trust its source']
    code, lines = run_pretrain(['--config', config, '--checkpoint', path, '--trust_checkpoint'], tmp_path, capsys)
    assert code == 2 and lines[0].startswith(f'error: {path} does not fit models.model_pretrain.ALBEF'), lines
    trusting = demo_config('Pretrain', batch_size=8, queue_size=32, num_workers=0, trust_checkpoint=True)
    code, lines = run_pretrain(['--config', trusting, '--checkpoint', path], tmp_path, capsys)
    assert code == 2 and lines[0].startswith(f'error: {path} does not fit models.model_pretrain.ALBEF'), lines


def test_a_task_the_checkpoint_does_not_fit(demo):
    ve = save_task_checkpoint(demo, 've')
    with pytest.raises(CheckpointError, match=rf'^{ve} does not fit models\.model_retrieval\.ALBEF \(no conversion\): '
                                              r'.*missing: .*itm_head\.weight'):
        models.load(ve, task='retrieval', device='cpu')
    with pytest.raises(ValueError, match="task must be one of pretrain, pretrain_nlvr, retrieval, vqa, ve, nlvr, "
                                         "got 'grounding'"):
        models.load(ve, task='grounding')
