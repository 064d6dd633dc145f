"""Image-text retrieval on MSCOCO / Flickr30K (docs/DESIGN.md, "Retrieval (Retrieval.py)"):
fine-tuning with ITC + ITM, and
evaluation by ITC candidates re-ranked with ITM.

    python Retrieval.py --config configs/Retrieval_flickr.yaml --checkpoint ALBEF.pth --output_dir out
    python Retrieval.py --config configs/Retrieval_coco.yaml --checkpoint mscoco.pth --output_dir out --evaluate
"""
import configuration
import tasks

TASK = tasks.RETRIEVAL  # its config keys and their checks, datasets, model: tasks.py
configuration.precheck(__name__, TASK)  # config mistakes in a second, before torch loads

import torch

import engine
import utils
from models.model_retrieval import ALBEF
from models.retrieval_eval import chance_metrics, image_features, itm_eval, retrieval_scores, text_features


def train_step(model, batch, alpha, run, update_momentum=True):
    batch = batch.to(run.device)  # captions tokenised by the loader workers (dataset.RetrievalCollate)
    loss_ita, loss_itm = model(batch.image, batch.text, alpha=alpha, idx=batch.idx, update_momentum=update_momentum)
    return {'loss_itm': loss_itm, 'loss_ita': loss_ita}


@torch.no_grad()
def evaluation(model, data_loader, tokenizer, device, config):
    """(score_i2t, score_t2i) of the whole split, as numpy arrays on every rank.

    Each rank encodes its share of the images (the loader's: every world-th image) and of the
    texts, and the features are all-gathered once; the re-ranking then splits the query rows
    across ranks. The scores are those of one process.
    """
    model.eval()
    itc_only = config.get('itc_only', False)
    dataset = data_loader.dataset
    utils.print0(f"Evaluating {len(dataset.image)} images x {len(dataset.text)} texts at "
          f"{config['image_res']} px: " + ('ITC similarity only' if itc_only else
                                           f"ITC top-{config['k_test']} re-ranked by ITM"))
    rank, world_size = utils.get_rank(), utils.get_world_size()
    text_feats, text_embeds, text_atts = (
        utils.gather_rows(t, len(dataset.text), strided=True)
        for t in text_features(model, dataset.text[rank::world_size], tokenizer, device))
    image_feats, image_embeds = [], []
    for batch in utils.progress(data_loader, desc='image features', disable=not utils.is_main_process(),
                                leave=False):
        feats, embeds = image_features(model, utils.to_device(batch.image, device))
        image_feats.append(feats)
        image_embeds.append(embeds)
    image_feats, image_embeds = (utils.gather_rows(torch.cat(t), len(dataset.image), strided=True)
                                 for t in (image_feats, image_embeds))
    return retrieval_scores(model, image_feats, image_embeds, text_feats, text_embeds,
                            text_atts, config['k_test'], itc_only, config.get('rerank_pairs_per_pass', 1024))


def evaluate_split(model, loader, run):
    score_i2t, score_t2i = evaluation(model, loader, run.tokenizer, run.device, run.config)
    dataset = loader.dataset
    result = itm_eval(score_i2t, score_t2i, dataset.txt2img, dataset.img2txt)
    chance = chance_metrics(len(dataset.image), len(dataset.text), len(dataset.text) / len(dataset.image))
    utils.print0(f"r_mean {result['r_mean']:.2f} (txt {result['txt_r_mean']:.2f}, img {result['img_r_mean']:.2f}); "
          f"a random ranking: {chance['r_mean']:.2f}")
    return result


def main(args):
    run = engine.setup(args, TASK)
    config = run.config

    utils.print0('Creating retrieval dataset')
    # each rank encodes every world-th image of val and test (see evaluation)
    train_loader, val_loader, test_loader = engine.task_loaders(run, TASK, config['batch_size_train'],
                                                                config['batch_size_test'])

    utils.print0('Creating model')
    training = engine.prepare(run, ALBEF(config=config, text_encoder=engine.bert_weights(config),
                                         tokenizer=run.tokenizer))
    evaluate = engine.split_evaluator({'val': val_loader, 'test': test_loader},
                                      lambda loader: evaluate_split(training.module, loader, run))
    engine.fit(run, training, train_loader, train_step, evaluate, best_key='val_r_mean',
               evaluate_only=args.evaluate, alpha_ramp=config['warm_up'])


def get_parser():
    return engine.task_parser(__doc__, './configs/Retrieval_flickr.yaml', 'output/Retrieval_flickr',
                              evaluate='evaluate the checkpoint, no training')


if __name__ == '__main__':
    engine.launch(main, get_parser())
